//! Vectored I/O between files and guest memory.
//!
//! [`preadv_all`] and [`pwritev_all`] hand a request's buffers (vm-memory
//! [`VolatileSlice`]s, which may be guest memory) straight to the kernel,
//! so file-backed layers move data with no copy in user space. This is
//! the crate's only `unsafe` code besides the raw-file `fallocate` calls.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::VolatileSlice;

/// Most iovecs one `preadv`/`pwritev` accepts (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Fills `bufs`, in order, from `file` starting at `offset`, with as few
/// `preadv(2)` calls as the kernel allows. Reaching the end of the file
/// first is an `UnexpectedEof` error.
pub fn preadv_all(file: &File, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
    // The guards keep each slice's mapping pinned (a no-op for plain mmap)
    // until the last syscall has returned.
    let guards: Vec<PtrGuardMut> = bufs.iter().map(VolatileSlice::ptr_guard_mut).collect();
    let iov = guards
        .iter()
        .zip(bufs)
        .map(|(g, b)| iovec(g.as_ptr(), b.len()))
        .collect();
    vectored_io(iov, offset, |iov, off| {
        // SAFETY: `iov` is a live slice of `iov.len()` iovecs (at most
        // IOV_MAX). Each one points inside a `VolatileSlice`, whose
        // invariant is that the memory is mapped and valid for writes of
        // its length for the slice's lifetime, which outlasts this call;
        // `guards` pins the mappings. `vectored_io` only ever shrinks an
        // entry from the front. The kernel writes the bytes; no Rust
        // reference to that memory exists, so the guest changing it
        // concurrently breaks no aliasing rule.
        unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        }
    })
    .map_err(|e| match e {
        VectoredError::Os(e) => e,
        VectoredError::Short => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "read past the end of the file",
        ),
    })
}

/// Writes the concatenation of `bufs` to `file` at `offset` with as few
/// `pwritev(2)` calls as the kernel allows.
pub fn pwritev_all(file: &File, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
    let guards: Vec<PtrGuard> = bufs.iter().map(VolatileSlice::ptr_guard).collect();
    let iov = guards
        .iter()
        .zip(bufs)
        .map(|(g, b)| iovec(g.as_ptr().cast_mut(), b.len()))
        .collect();
    vectored_io(iov, offset, |iov, off| {
        // SAFETY: as in `preadv_all`, every iovec lies inside a live,
        // pinned `VolatileSlice` valid for reads of its length; the kernel
        // only reads the bytes, and no Rust reference to them exists.
        unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        }
    })
    .map_err(|e| match e {
        VectoredError::Os(e) => e,
        VectoredError::Short => io::Error::new(io::ErrorKind::WriteZero, "file accepted no bytes"),
    })
}

fn iovec(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

enum VectoredError {
    Os(io::Error),
    /// The syscall moved no bytes with bytes left to move.
    Short,
}

/// Calls `op(iovecs, offset)` until every byte of `iov` has moved,
/// advancing past what each call reports.
fn vectored_io(
    mut iov: Vec<libc::iovec>,
    mut offset: u64,
    op: impl Fn(&[libc::iovec], libc::off_t) -> isize,
) -> Result<(), VectoredError> {
    iov.retain(|v| v.iov_len > 0);
    let mut start = 0;
    while start < iov.len() {
        let end = iov.len().min(start + IOV_MAX);
        let off = libc::off_t::try_from(offset).map_err(|_| {
            VectoredError::Os(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} is too large"),
            ))
        })?;
        let ret = op(&iov[start..end], off);
        let mut moved = match usize::try_from(ret) {
            Ok(0) => return Err(VectoredError::Short),
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VectoredError::Os(e));
            }
        };
        offset += moved as u64;
        while moved > 0 {
            // The kernel never reports more than it was offered.
            let Some(v) = iov.get_mut(start) else { break };
            if moved >= v.iov_len {
                moved -= v.iov_len;
                start += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(moved).cast();
                v.iov_len -= moved;
                moved = 0;
            }
        }
    }
    Ok(())
}
