//! [`DiskDevice`]: an existing raw file or block device served as is
//! (`recovery-cli serve --disk`), through [`Target`]: the same exclusive
//! open and the same zeroing as a migration target in passthrough.

use std::io;

use vm_memory::VolatileSlice;

use crate::device::{BlockDevice, ReadRun};
use crate::target::Target;

/// A [`Target`] as a [`BlockDevice`]: every request goes to the file.
#[derive(Debug)]
pub struct DiskDevice {
    target: Target,
}

impl DiskDevice {
    /// Serves `target`.
    pub fn new(target: Target) -> DiskDevice {
        DiskDevice { target }
    }

    /// The file or device served.
    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl BlockDevice for DiskDevice {
    fn size(&self) -> u64 {
        self.target.image_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.target.read_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.target.read_run(&mut ReadRun::Guest(bufs), offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.target.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.target.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.target.zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.target.zero(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::TargetOpen;

    #[test]
    fn a_disk_serves_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let how = TargetOpen {
            create: false,
            lock: true,
        };
        let dev = DiskDevice::new(Target::open_with(&path, 1 << 16, how).unwrap());
        crate::device::tests::check_vectored_read(&dev, 100, &[1, 4000, 3]);
        dev.write_at(&[1; 512], 512).unwrap();
        dev.write_zeroes(4096, 4096).unwrap();
        dev.flush().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[512..1024], &[1; 512][..]);
        assert!(got[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(got[8192], 7);
    }
}
