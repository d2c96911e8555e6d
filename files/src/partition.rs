//! Partition tables: GPT and MBR (with logical partitions in an extended
//! one), parsed defensively because the bytes come from a guest.
//!
//! Written here rather than taken from `gpt`/`mbrman`: both are table
//! editors. `mbrman` adds untrusted `u32` LBAs without overflow checks (a
//! panic under debug assertions) and keeps every EBR of a chain in memory;
//! here every number is bounds-checked, an EBR chain is capped and must move
//! forward inside its extended partition, a GPT may have at most
//! [`MAX_GPT_ENTRIES`] entries of at most 1 KiB, and both header and entry
//! array CRCs are checked (the backup header is used when the primary is bad).
//!
//! Partition numbers follow Linux: GPT and MBR primaries by slot (`p1`..`p4`
//! for MBR, empty slots skipped but counted), logical partitions from `p5`.

use serde::Serialize;

use crate::device::ReadAt;
use crate::error::Result;

/// Sector size assumed for MBR and tried first for GPT.
pub const SECTOR: u64 = 512;
/// Most GPT entries accepted (the spec's minimum array holds 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Most logical partitions followed in an EBR chain.
pub const MAX_LOGICAL: usize = 256;

/// Which partition table a disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// No table: a filesystem (or nothing) on the whole disk.
    None,
    /// GUID partition table.
    Gpt,
    /// DOS master boot record.
    Mbr,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// Linux-style number: `p{number}`.
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes (clamped to the disk).
    pub size: u64,
    /// GPT type GUID or MBR type byte (`0x83`).
    pub type_id: String,
    /// GPT partition name, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An MBR extended partition (a container of logical partitions).
    pub extended: bool,
}

/// A disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    pub kind: TableKind,
    pub partitions: Vec<Partition>,
}

/// Reads `buf.len()` bytes at `offset`, or `false` when past the end.
fn read_opt(dev: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<bool> {
    match offset.checked_add(buf.len() as u64) {
        Some(end) if end <= dev.size() => {
            dev.read_at(buf, offset)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// CRC-32 (IEEE, reflected), as GPT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A partition `start..start + size` (in sectors) clamped to the disk, or
/// `None` when it is empty or starts beyond the disk.
fn span(disk: u64, sector: u64, start: u64, sectors: u64) -> Option<(u64, u64)> {
    let start = start.checked_mul(sector)?;
    if sectors == 0 || start >= disk {
        return None;
    }
    let size = sectors.saturating_mul(sector).min(disk - start);
    Some((start, size))
}

/// Read the partition table of `dev` (`TableKind::None` when there is none).
pub fn read_table(dev: &dyn ReadAt) -> Result<Table> {
    let mut mbr = [0u8; SECTOR as usize];
    if !read_opt(dev, &mut mbr, 0)? || mbr[510..512] != [0x55, 0xAA] {
        return Ok(Table {
            kind: TableKind::None,
            partitions: Vec::new(),
        });
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    if entries.iter().any(|e| e[4] == 0xEE) {
        for sector in [SECTOR, 4096] {
            if let Some(parts) = read_gpt(dev, sector)? {
                return Ok(Table {
                    kind: TableKind::Gpt,
                    partitions: parts,
                });
            }
        }
    }
    // A filesystem boot sector (FAT, NTFS) also ends in 55 AA: an MBR has
    // only 0x00/0x80 status bytes and at least one used slot.
    let plausible = entries.iter().all(|e| e[0] & 0x7F == 0)
        && entries.iter().any(|e| e[4] != 0 && le32(e, 12) != 0)
        && &mbr[3..11] != b"NTFS    ";
    if !plausible {
        return Ok(Table {
            kind: TableKind::None,
            partitions: Vec::new(),
        });
    }
    let disk = dev.size();
    let mut parts = Vec::new();
    let mut logical = Vec::new();
    for (slot, e) in entries.iter().enumerate() {
        let ty = e[4];
        let Some((start, size)) = span(disk, SECTOR, le32(e, 8) as u64, le32(e, 12) as u64) else {
            continue;
        };
        if ty == 0 {
            continue;
        }
        let extended = matches!(ty, 0x05 | 0x0F | 0x85);
        parts.push(Partition {
            number: slot as u32 + 1,
            start,
            size,
            type_id: format!("0x{ty:02x}"),
            name: None,
            extended,
        });
        if extended && logical.is_empty() {
            logical = read_ebr_chain(dev, start, size)?;
        }
    }
    for (i, (start, size, ty)) in logical.into_iter().enumerate() {
        parts.push(Partition {
            number: 5 + i as u32,
            start,
            size,
            type_id: format!("0x{ty:02x}"),
            name: None,
            extended: false,
        });
    }
    Ok(Table {
        kind: TableKind::Mbr,
        partitions: parts,
    })
}

/// Follows the EBR chain of the extended partition `ext_start..+ext_size`.
/// Each EBR's first entry is a logical partition relative to the EBR, its
/// second the next EBR relative to the extended partition. The chain must
/// strictly move forward inside the extended partition (no loops) and is
/// capped at [`MAX_LOGICAL`].
fn read_ebr_chain(dev: &dyn ReadAt, ext_start: u64, ext_size: u64) -> Result<Vec<(u64, u64, u8)>> {
    let disk = dev.size();
    let ext_end = ext_start + ext_size;
    let mut out = Vec::new();
    let mut ebr = ext_start;
    let mut buf = [0u8; SECTOR as usize];
    while out.len() < MAX_LOGICAL {
        if !read_opt(dev, &mut buf, ebr)? || buf[510..512] != [0x55, 0xAA] {
            break;
        }
        let (first, next) = (&buf[446..462], &buf[462..478]);
        if first[4] != 0 {
            let rel = le32(first, 8) as u64 * SECTOR;
            if let Some((start, size)) = ebr
                .checked_add(rel)
                .and_then(|s| span(disk, 1, s, le32(first, 12) as u64 * SECTOR))
            {
                out.push((start, size.min(ext_end.saturating_sub(start)), first[4]));
            }
        }
        let rel_next = le32(next, 8) as u64 * SECTOR;
        if next[4] == 0 || rel_next == 0 {
            break;
        }
        let next_ebr = ext_start + rel_next;
        if next_ebr <= ebr || next_ebr >= ext_end {
            tracing::warn!(
                ebr,
                next_ebr,
                "EBR chain goes backwards or leaves the extended partition; stopping"
            );
            break;
        }
        ebr = next_ebr;
    }
    out.retain(|p| p.1 > 0);
    Ok(out)
}

/// Formats a GPT GUID (first three fields little-endian).
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

fn read_gpt(dev: &dyn ReadAt, sector: u64) -> Result<Option<Vec<Partition>>> {
    let last = dev.size() / sector;
    for lba in [1, last.saturating_sub(1)] {
        if lba == 0 {
            continue;
        }
        if let Some(parts) = read_gpt_at(dev, sector, lba)? {
            return Ok(Some(parts));
        }
    }
    Ok(None)
}

fn read_gpt_at(dev: &dyn ReadAt, sector: u64, lba: u64) -> Result<Option<Vec<Partition>>> {
    let mut hdr = vec![0u8; sector as usize];
    if !read_opt(dev, &mut hdr, lba * sector)? || &hdr[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let hsize = le32(&hdr, 12) as usize;
    if !(92..=sector as usize).contains(&hsize) {
        return Ok(None);
    }
    let want = le32(&hdr, 16);
    let mut h = hdr[..hsize].to_vec();
    h[16..20].fill(0);
    if crc32(&h) != want {
        tracing::warn!(lba, "GPT header checksum mismatch");
        return Ok(None);
    }
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80);
    let esize = le32(&hdr, 84) as usize;
    if count > MAX_GPT_ENTRIES || !(128..=1024).contains(&esize) || !esize.is_multiple_of(8) {
        tracing::warn!(count, esize, "GPT entry array out of bounds");
        return Ok(None);
    }
    let mut arr = vec![0u8; count as usize * esize];
    let Some(at) = entries_lba.checked_mul(sector) else {
        return Ok(None);
    };
    if !read_opt(dev, &mut arr, at)? || crc32(&arr) != le32(&hdr, 88) {
        tracing::warn!(lba, "GPT entry array unreadable or checksum mismatch");
        return Ok(None);
    }
    let disk = dev.size();
    let mut parts = Vec::new();
    for (i, e) in arr.chunks_exact(esize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let Some((start, size)) = last
            .checked_sub(first)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| span(disk, sector, first, n))
        else {
            continue;
        };
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        parts.push(Partition {
            number: i as u32 + 1,
            start,
            size,
            type_id: guid(&e[0..16]),
            name: (!name.is_empty()).then_some(name),
            extended: false,
        });
    }
    Ok(Some(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr_entry(buf: &mut [u8], at: usize, ty: u8, start: u32, sectors: u32) {
        buf[at + 4] = ty;
        buf[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        buf[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
    }

    #[test]
    fn crc32_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn ebr_loop_and_backward_links_stop() {
        let mut d = vec![0u8; 1 << 20];
        d[510] = 0x55;
        d[511] = 0xAA;
        mbr_entry(&mut d, 446, 0x05, 100, 1000);
        // EBR at sector 100: logical at +10, next EBR at ext+200.
        let e1 = 100 * 512;
        d[e1 + 510] = 0x55;
        d[e1 + 511] = 0xAA;
        mbr_entry(&mut d, e1 + 446, 0x83, 10, 50);
        mbr_entry(&mut d, e1 + 462, 0x05, 200, 100);
        // EBR at sector 300 points back to the first one.
        let e2 = 300 * 512;
        d[e2 + 510] = 0x55;
        d[e2 + 511] = 0xAA;
        mbr_entry(&mut d, e2 + 446, 0x83, 10, 50);
        mbr_entry(&mut d, e2 + 462, 0x05, 0x0, 0);
        mbr_entry(&mut d, e2 + 462, 0x05, 1, 100);
        let t = read_table(&d).unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        let nums: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
        assert_eq!(nums, [1, 5, 6]);
        assert_eq!(t.partitions[1].start, 110 * 512);
        assert_eq!(t.partitions[2].start, 310 * 512);
    }

    #[test]
    fn huge_and_overflowing_mbr_values_are_clamped_or_dropped() {
        let mut d = vec![0u8; 4096];
        d[510] = 0x55;
        d[511] = 0xAA;
        mbr_entry(&mut d, 446, 0x83, 1, u32::MAX);
        mbr_entry(&mut d, 462, 0x83, u32::MAX, u32::MAX);
        let t = read_table(&d).unwrap();
        assert_eq!(t.partitions.len(), 1);
        assert_eq!(t.partitions[0].size, 4096 - 512);
    }

    #[test]
    fn no_signature_means_no_table() {
        let t = read_table(&vec![0u8; 8192]).unwrap();
        assert_eq!(t.kind, TableKind::None);
        let t = read_table(&vec![0u8; 10]).unwrap();
        assert_eq!(t.kind, TableKind::None);
    }
}
