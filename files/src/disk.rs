//! A disk image as a tree of volumes: its partition table, what each
//! partition holds, and how a user's path (`/p2/etc/fstab`) maps onto them.

use std::sync::Arc;

use serde::Serialize;

use crate::detect::{detect, FsKind};
use crate::device::{ReadAt, Slice};
use crate::error::{Error, Result};
use crate::partition::{read_table, TableKind};

/// One place that can hold a filesystem: a partition, or the whole disk.
#[derive(Debug, Clone, Serialize)]
pub struct Volume {
    /// `p1`, `p5`, ...; empty for the whole disk of an unpartitioned image.
    pub name: String,
    /// Byte offset on the disk.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// What was detected on it.
    pub fs: FsKind,
    /// Filesystem label, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Partition type (GPT GUID or MBR byte), if partitioned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_type: Option<String>,
    /// GPT partition name, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_name: Option<String>,
}

/// A disk image with its volumes. `Send + Sync`; filesystems are opened per
/// thread by [`crate::browse::Browser`].
pub struct Disk {
    dev: Arc<dyn ReadAt>,
    table: TableKind,
    volumes: Vec<Volume>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("table", &self.table)
            .field("volumes", &self.volumes)
            .finish_non_exhaustive()
    }
}

/// Where a user's path points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The top of a partitioned disk (lists `p1`, `p2`, ...).
    Top,
    /// `inner` (absolute, `/`-separated, no `.`/`..`) inside volume `vol`.
    Volume { vol: usize, inner: String },
}

/// Split a user path into its components: empty and `.` components are
/// dropped, `..` is refused (paths are absolute from the snapshot's top, and
/// a name inside the image cannot reach outside it).
pub fn components(path: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::InvalidPath {
                    path: path.to_string(),
                    reason: "'..' is not allowed (paths start at the snapshot's top)",
                })
            }
            c if c.contains('\0') => {
                return Err(Error::InvalidPath {
                    path: path.to_string(),
                    reason: "NUL byte in path",
                })
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

impl Disk {
    /// Read the partition table of `dev` and detect each volume's filesystem.
    pub fn open(dev: Arc<dyn ReadAt>) -> Result<Disk> {
        let table = read_table(dev.as_ref())?;
        let mut volumes = Vec::new();
        if table.kind == TableKind::None {
            let d = detect(dev.as_ref())?;
            volumes.push(Volume {
                name: String::new(),
                start: 0,
                size: dev.size(),
                fs: d.kind,
                label: d.label,
                part_type: None,
                part_name: None,
            });
        }
        for p in &table.partitions {
            let (fs, label) = if p.extended {
                (FsKind::Extended, None)
            } else {
                let d = detect(&Slice::new(dev.clone(), p.start, p.size))?;
                (d.kind, d.label)
            };
            volumes.push(Volume {
                name: format!("p{}", p.number),
                start: p.start,
                size: p.size,
                fs,
                label,
                part_type: Some(p.type_id.clone()),
                part_name: p.name.clone(),
            });
        }
        tracing::debug!(table = ?table.kind, volumes = volumes.len(), "opened disk");
        Ok(Disk {
            dev,
            table: table.kind,
            volumes,
        })
    }

    /// The whole image.
    pub fn device(&self) -> &Arc<dyn ReadAt> {
        &self.dev
    }

    /// The partition table kind.
    pub fn table(&self) -> TableKind {
        self.table
    }

    /// Whether the top level lists partitions.
    pub fn partitioned(&self) -> bool {
        self.table != TableKind::None
    }

    /// All volumes (partitions in table order, or the whole disk).
    pub fn volumes(&self) -> &[Volume] {
        &self.volumes
    }

    /// The bytes of volume `vol`.
    pub fn volume_device(&self, vol: usize) -> Slice {
        let v = &self.volumes[vol];
        Slice::new(self.dev.clone(), v.start, v.size)
    }

    /// Map a user path to a volume and a path inside it.
    pub fn locate(&self, path: &str) -> Result<Location> {
        let parts = components(path)?;
        if !self.partitioned() {
            return Ok(Location::Volume {
                vol: 0,
                inner: format!("/{}", parts.join("/")),
            });
        }
        let Some((first, rest)) = parts.split_first() else {
            return Ok(Location::Top);
        };
        let Some(vol) = self.volumes.iter().position(|v| v.name == *first) else {
            return Err(Error::NotFound {
                path: format!(
                    "{path} (this disk has {})",
                    self.volumes
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        };
        Ok(Location::Volume {
            vol,
            inner: format!("/{}", rest.join("/")),
        })
    }

    /// The user-visible path of `inner` in volume `vol`.
    pub fn display_path(&self, vol: usize, inner: &str) -> String {
        let name = &self.volumes[vol].name;
        match (name.is_empty(), inner) {
            (true, _) => inner.to_string(),
            (false, "/") => format!("/{name}"),
            (false, _) => format!("/{name}{inner}"),
        }
    }

    /// Fails unless volume `vol` can be read in-process.
    pub fn check_readable(&self, vol: usize) -> Result<()> {
        let v = &self.volumes[vol];
        if v.fs.readable() {
            return Ok(());
        }
        Err(Error::NotReadable {
            part: if v.name.is_empty() {
                "The disk".to_string()
            } else {
                format!("Partition {}", v.name)
            },
            detected: v.fs.to_string(),
            offset: v.start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotdot_is_refused_and_dots_dropped() {
        assert!(matches!(
            components("/p1/../etc"),
            Err(Error::InvalidPath { .. })
        ));
        assert_eq!(components("//p1/./etc/").unwrap(), ["p1", "etc"]);
    }

    #[test]
    fn unpartitioned_disk_has_its_filesystem_at_the_top() {
        let d = Disk::open(Arc::new(vec![0u8; 65536])).unwrap();
        assert!(!d.partitioned());
        assert_eq!(
            d.locate("/etc").unwrap(),
            Location::Volume {
                vol: 0,
                inner: "/etc".into()
            }
        );
        let e = d.check_readable(0).unwrap_err().to_string();
        assert!(
            e.contains("not readable in-process") && e.contains("mount"),
            "{e}"
        );
    }
}
