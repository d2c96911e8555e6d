//! Filesystem detection by magic numbers (a few KiB read per volume).

use serde::Serialize;

use crate::device::ReadAt;
use crate::error::Result;

/// What a volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Btrfs,
    Ntfs,
    Vfat,
    /// An LVM physical volume.
    Lvm,
    Swap,
    /// An MBR extended partition (container of logical ones).
    Extended,
    /// Nothing recognised.
    Unknown,
}

impl FsKind {
    /// Readable in-process (through `ext4-view`).
    pub fn readable(self) -> bool {
        matches!(self, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4)
    }

    /// Human name.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Ntfs => "ntfs",
            FsKind::Vfat => "vfat",
            FsKind::Lvm => "LVM2 physical volume",
            FsKind::Swap => "swap",
            FsKind::Extended => "extended partition",
            FsKind::Unknown => "no recognised filesystem",
        }
    }
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Detected filesystem and its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub kind: FsKind,
    pub label: Option<String>,
}

fn label(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Bytes of the first 68 KiB (enough for every magic below); shorter
/// volumes are zero-padded.
const PROBE: usize = 0x10000 + 4096;

/// Detect the filesystem on `vol`.
pub fn detect(vol: &dyn ReadAt) -> Result<Detected> {
    let n = (vol.size().min(PROBE as u64)) as usize;
    let mut b = vec![0u8; PROBE];
    vol.read_at(&mut b[..n], 0)?;
    let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let found = |kind, label| Ok(Detected { kind, label });

    // ext2/3/4: superblock at 1024, s_magic at +56.
    if b[1024 + 56..1024 + 58] == [0x53, 0xEF] {
        let compat = le32(1024 + 92);
        let incompat = le32(1024 + 96);
        let ro_compat = le32(1024 + 100);
        // extents, 64bit, flex_bg, ...; huge_file, gdt_csum, dir_nlink, extra_isize, metadata_csum
        let kind = if incompat & !0x7 != 0 || ro_compat & !0x7 != 0 {
            FsKind::Ext4
        } else if compat & 0x4 != 0 {
            FsKind::Ext3
        } else {
            FsKind::Ext2
        };
        return found(kind, label(&b[1024 + 120..1024 + 136]));
    }
    if &b[0..4] == b"XFSB" {
        return found(FsKind::Xfs, label(&b[108..120]));
    }
    if &b[0x10040..0x10048] == b"_BHRfS_M" {
        return found(FsKind::Btrfs, label(&b[0x1012b..0x1012b + 256]));
    }
    if &b[3..11] == b"NTFS    " {
        return found(FsKind::Ntfs, None);
    }
    for at in [0usize, 512, 1024, 1536] {
        if &b[at..at + 8] == b"LABELONE" && &b[at + 24..at + 32] == b"LVM2 001" {
            return found(FsKind::Lvm, None);
        }
    }
    if &b[4086..4096] == b"SWAPSPACE2" || &b[4086..4096] == b"SWAP-SPACE" {
        return found(FsKind::Swap, label(&b[1024 + 28..1024 + 44]));
    }
    if b[510..512] == [0x55, 0xAA] && (&b[82..87] == b"FAT32" || &b[54..57] == b"FAT") {
        let at = if &b[82..87] == b"FAT32" { 71 } else { 43 };
        return found(
            FsKind::Vfat,
            label(&b[at..at + 11]).filter(|l| l != "NO NAME"),
        );
    }
    found(FsKind::Unknown, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_recognised() {
        let mut ext = vec![0u8; 8192];
        ext[1080] = 0x53;
        ext[1081] = 0xEF;
        ext[1024 + 120..1024 + 124].copy_from_slice(b"root");
        assert_eq!(detect(&ext).unwrap().kind, FsKind::Ext2);
        ext[1024 + 92] = 4;
        assert_eq!(detect(&ext).unwrap().kind, FsKind::Ext3);
        ext[1024 + 96] = 0x40;
        let d = detect(&ext).unwrap();
        assert_eq!((d.kind, d.label.as_deref()), (FsKind::Ext4, Some("root")));

        let mut xfs = vec![0u8; 512];
        xfs[0..4].copy_from_slice(b"XFSB");
        assert_eq!(detect(&xfs).unwrap().kind, FsKind::Xfs);

        let mut swap = vec![0u8; 4096];
        swap[4086..].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(detect(&swap).unwrap().kind, FsKind::Swap);

        assert_eq!(detect(&vec![0u8; 3]).unwrap().kind, FsKind::Unknown);
    }
}
