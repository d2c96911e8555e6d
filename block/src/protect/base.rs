//! [`Protected`]: the device a protection layer protects, and, when it
//! has one, its immutable base (the snapshot layer at the bottom of an
//! instant-boot stack).
//!
//! Copy-before-write needs the old contents of a grain only until the
//! point reads it. When the guest still sees a grain as the snapshot's
//! bytes at its first write after the instant, those old contents are in
//! the snapshot, which never changes: the layer records "read it from the
//! snapshot" instead of copying it ([`Base::shows_snapshot`]). That
//! saves the guest's write a 4 KiB read that fetches, decompresses and
//! verifies a whole store chunk.

use std::io;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::migrate::MigratingDevice;
use crate::overlay::Overlay;
use crate::snapshot::SnapshotLayer;

/// What a [`ProtectLayer`](super::ProtectLayer) protects.
#[derive(Clone)]
pub enum Protected {
    /// Any device (`serve --disk`, tests): no immutable base, every grain
    /// is copied.
    Device(Arc<dyn BlockDevice>),
    /// An overlay over `snapshot`, its lower layer: a block the overlay
    /// does not hold is the snapshot's.
    Overlay {
        /// The overlay, the protected device.
        overlay: Arc<Overlay>,
        /// The overlay's lower layer.
        snapshot: Arc<SnapshotLayer>,
    },
    /// A migration: see [`MigratingDevice::shows_snapshot`]. Once it is
    /// complete (or if it already was), every grain is copied.
    Migrating(Arc<MigratingDevice>),
}

impl From<Arc<dyn BlockDevice>> for Protected {
    fn from(device: Arc<dyn BlockDevice>) -> Protected {
        Protected::Device(device)
    }
}

impl std::fmt::Debug for Protected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protected::Device(_) => "Protected::Device",
            Protected::Overlay { .. } => "Protected::Overlay",
            Protected::Migrating(_) => "Protected::Migrating",
        })
    }
}

/// How to tell whether the guest sees a range as the snapshot's bytes.
enum View {
    Overlay(Arc<Overlay>),
    Migrating(Arc<MigratingDevice>),
}

/// The immutable snapshot under the protected device.
pub(crate) struct Base {
    snapshot: Arc<SnapshotLayer>,
    view: View,
}

impl Protected {
    /// The device, and its base if it has one.
    pub(crate) fn split(self) -> io::Result<(Arc<dyn BlockDevice>, Option<Base>)> {
        Ok(match self {
            Protected::Device(d) => (d, None),
            Protected::Overlay { overlay, snapshot } => {
                if !std::ptr::addr_eq(Arc::as_ptr(overlay.lower()), Arc::as_ptr(&snapshot)) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the snapshot layer is not the overlay's lower layer",
                    ));
                }
                let base = Base {
                    snapshot,
                    view: View::Overlay(overlay.clone()),
                };
                (overlay, Some(base))
            }
            Protected::Migrating(m) => {
                let base = m.snapshot().map(|snapshot| Base {
                    snapshot,
                    view: View::Migrating(m.clone()),
                });
                (m, base)
            }
        })
    }
}

impl Base {
    /// Whether the guest sees `offset..offset + len` as the snapshot's
    /// bytes now. Once true, it stays true until a guest write to the
    /// range (overlay bits never clear; for a migration see
    /// [`MigratingDevice::shows_snapshot`]).
    pub(crate) fn shows_snapshot(&self, offset: u64, len: u64) -> bool {
        match &self.view {
            View::Overlay(o) => len > 0 && !o.any_present(offset, len),
            View::Migrating(m) => m.shows_snapshot(offset, len),
        }
    }

    /// Reads the snapshot's bytes at `offset`.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.snapshot.read_at(buf, offset)
    }
}
