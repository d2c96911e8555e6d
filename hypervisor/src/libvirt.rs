//! libvirt, through `virsh`: the few domain, checkpoint and backup-job
//! operations a pull-mode backup needs, each a typed call.
//!
//! libvirt owns the QMP monitor of the domains it manages, so a backup of
//! such a domain goes through libvirt's backup API (`virDomainBackupBegin`
//! in pull mode, `virDomainCheckpoint*`). `virsh` is libvirt's own client
//! of that API and is installed wherever libvirtd is; driving it keeps
//! this crate free of a C library dependency. Each call is one `virsh`
//! process in its own process group (a Ctrl-C on the terminal reaches
//! recovery-cli, which then cleans up through virsh, and not virsh
//! itself), and a failure names the virsh command and libvirt's answer.
//!
//! The backup itself (decide full or incremental, begin, read the NBD
//! export, end the job, keep checkpoints consistent) is in [`backup`].

pub mod backup;

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use tracing::debug;

use crate::pacing::{IoTotals, LatencyProbe};

/// Errors of talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Could not run virsh (is libvirt-clients installed?)")]
    Spawn(#[source] io::Error),
    #[error("virsh {command} failed: {answer}")]
    Virsh { command: String, answer: String },
    #[error("Unexpected answer of virsh {command}: {detail}")]
    Answer { command: String, detail: String },
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A connection to libvirt (`virsh -c URI`; `None`: virsh's default).
#[derive(Debug, Clone)]
pub struct Virsh {
    uri: Option<String>,
}

/// A disk of a domain, as its live XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Target name (`vda`).
    pub target: String,
    /// Image format (`qcow2`, `raw`, …).
    pub format: String,
    /// Source file, if it is a file.
    pub source: Option<String>,
}

/// The domain's DAC label (`+uid:+gid`): the user QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A running pull-mode backup job, as `backup-dumpxml` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJob {
    /// Unix socket of the NBD server.
    pub socket: Option<String>,
    /// Per disk: (target, export name, exported bitmap).
    pub exports: Vec<(String, String, Option<String>)>,
}

impl Virsh {
    pub fn new(uri: Option<&str>) -> Virsh {
        Virsh {
            uri: uri.map(str::to_owned),
        }
    }

    /// The URI as given (`default` when virsh picks it).
    pub fn uri(&self) -> &str {
        self.uri.as_deref().unwrap_or("default")
    }

    /// Run `virsh ARGS`; its stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("virsh");
        if let Some(u) = &self.uri {
            cmd.args(["-c", u]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        debug!(?args, "virsh");
        let out = cmd.output().map_err(Error::Spawn)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err
                .lines()
                .map(|l| l.trim().trim_start_matches("error: ").trim())
                .filter(|l| !l.is_empty())
                .collect();
            return Err(Error::Virsh {
                command: args.join(" "),
                answer: if lines.is_empty() {
                    format!("exit status {}", out.status)
                } else {
                    lines.join("; ")
                },
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The live domain XML.
    pub fn domain_xml(&self, domain: &str) -> Result<String> {
        self.run(&["dumpxml", domain])
    }

    /// Capacity of `disk` in bytes.
    pub fn disk_size(&self, domain: &str, disk: &str) -> Result<u64> {
        let out = self.run(&["domblkinfo", domain, disk])?;
        field(&out, "Capacity")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Answer {
                command: format!("domblkinfo {domain} {disk}"),
                detail: format!("no capacity in {out:?}"),
            })
    }

    /// The guest's I/O counters of `disk` (`domblkstat`).
    pub fn blkstat(&self, domain: &str, disk: &str) -> Result<IoTotals> {
        let out = self.run(&["domblkstat", domain, disk])?;
        parse_blkstat(&out).ok_or_else(|| Error::Answer {
            command: format!("domblkstat {domain} {disk}"),
            detail: format!("no read and write counters in {out:?}"),
        })
    }

    /// Names of the domain's checkpoints.
    pub fn checkpoints(&self, domain: &str) -> Result<Vec<String>> {
        let out = self.run(&["checkpoint-list", domain, "--name"])?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Delete a checkpoint and its bitmaps (libvirt's rules keep the
    /// other checkpoints of the chain valid).
    pub fn checkpoint_delete(&self, domain: &str, name: &str) -> Result<()> {
        self.run(&["checkpoint-delete", domain, name]).map(drop)
    }

    /// `virDomainBackupBegin` with the backup XML and, optionally, a
    /// checkpoint XML (files: virsh reads them).
    pub fn backup_begin(
        &self,
        domain: &str,
        backup: &Path,
        checkpoint: Option<&Path>,
    ) -> Result<()> {
        let b = backup.to_string_lossy();
        let c = checkpoint.map(|c| c.to_string_lossy().into_owned());
        let mut args = vec!["backup-begin", domain, &b];
        args.extend(c.as_deref());
        self.run(&args).map(drop)
    }

    /// The domain's running backup job, if any.
    pub fn backup_job(&self, domain: &str) -> Result<Option<BackupJob>> {
        let info = self.run(&["domjobinfo", domain])?;
        if field(&info, "Operation") != Some("Backup") {
            return Ok(None);
        }
        let xml = match self.run(&["backup-dumpxml", domain]) {
            Ok(x) => x,
            // It ended meanwhile.
            Err(Error::Virsh { answer, .. }) if answer.contains("no domain backup job") => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        Ok(Some(parse_backup_job(&xml)))
    }

    /// End the domain's backup job (for a pull-mode backup this is the
    /// normal end: libvirt stops the export and removes the scratch file).
    pub fn job_abort(&self, domain: &str) -> Result<()> {
        match self.run(&["domjobabort", domain]) {
            Err(Error::Virsh { answer, .. }) if answer.contains("no job is active") => Ok(()),
            r => r.map(drop),
        }
    }
}

/// The counters in `virsh domblkstat`'s output (`vda rd_req 12` lines;
/// times in ns).
pub fn parse_blkstat(out: &str) -> Option<IoTotals> {
    let get = |key: &str| {
        out.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, k, v) = (f.next()?, f.next()?, f.next()?);
            (k == key).then(|| v.parse::<u64>().ok()).flatten()
        })
    };
    Some(IoTotals {
        read_ops: get("rd_req")?,
        read_ns: get("rd_total_times")?,
        write_ops: get("wr_req")?,
        write_ns: get("wr_total_times")?,
    })
}

/// [`Virsh::blkstat`] as the pacing's probe.
pub struct BlkstatProbe<'a> {
    pub virsh: &'a Virsh,
    pub domain: &'a str,
    pub disk: &'a str,
}

impl LatencyProbe for BlkstatProbe<'_> {
    fn totals(&mut self) -> std::result::Result<IoTotals, String> {
        self.virsh
            .blkstat(self.domain, self.disk)
            .map_err(|e| e.to_string())
    }
}

/// The value of `Name:   value` in virsh's key/value output.
fn field<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

/// The value of attribute `name` in the start tag `tag` (text from `<`
/// to `>`); libvirt writes `'`, users may write `"`.
pub fn attr(tag: &str, name: &str) -> Option<String> {
    let mut rest = tag;
    loop {
        let at = rest.find(name)?;
        let before = rest[..at].chars().last();
        let after = &rest[at + name.len()..];
        rest = after;
        if !before.is_some_and(char::is_whitespace) {
            continue;
        }
        let Some(after) = after.trim_start().strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start();
        let q = after.chars().next()?;
        if q != '\'' && q != '"' {
            continue;
        }
        let end = after[1..].find(q)?;
        return Some(unescape(&after[1..1 + end]));
    }
}

/// The start tags `<name …>` in `xml`, in order.
pub fn start_tags<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("<{name}");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let tail = &rest[i..];
        let next = tail[open.len()..].chars().next();
        let Some(end) = tail.find('>') else { break };
        if next.is_some_and(|c| c.is_whitespace() || c == '>' || c == '/') {
            out.push(&tail[..=end]);
        }
        rest = &tail[end + 1..];
    }
    out
}

/// The elements `<name …>…</name>` in `xml` (not nested), in order.
pub fn elements<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = xml;
    for tag in start_tags(xml, name) {
        let Some(i) = rest.find(tag) else { break };
        let tail = &rest[i..];
        let end = if tag.ends_with("/>") {
            tag.len()
        } else {
            tail.find(&close).map_or(tail.len(), |e| e + close.len())
        };
        out.push(&tail[..end]);
        rest = &tail[end..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Escape text for an XML attribute or element.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The disks (`device='disk'`) of a domain XML.
pub fn parse_disks(xml: &str) -> Vec<Disk> {
    elements(xml, "disk")
        .into_iter()
        .filter(|d| {
            let tag = start_tags(d, "disk").first().copied().unwrap_or("");
            attr(tag, "device").is_none_or(|v| v == "disk")
        })
        .filter_map(|d| {
            let target = start_tags(d, "target")
                .first()
                .and_then(|t| attr(t, "dev"))?;
            let format = start_tags(d, "driver")
                .first()
                .and_then(|t| attr(t, "type"))
                .unwrap_or_else(|| "raw".into());
            let source = start_tags(d, "source")
                .first()
                .and_then(|t| attr(t, "file").or_else(|| attr(t, "dev")));
            Some(Disk {
                target,
                format,
                source,
            })
        })
        .collect()
}

/// The user QEMU runs as: the DAC `<label>+uid:+gid</label>` of the
/// domain's `<seclabel model='dac'>` (none for session domains).
pub fn parse_owner(xml: &str) -> Option<Owner> {
    let label = elements(xml, "seclabel").into_iter().find(|s| {
        start_tags(s, "seclabel")
            .first()
            .and_then(|t| attr(t, "model"))
            .as_deref()
            == Some("dac")
    })?;
    let text = label.split_once("<label>")?.1.split_once("</label>")?.0;
    let (u, g) = text.trim().split_once(':')?;
    Some(Owner {
        uid: u.trim_start_matches('+').parse().ok()?,
        gid: g.trim_start_matches('+').parse().ok()?,
    })
}

/// The socket and exports of a `backup-dumpxml` answer.
pub fn parse_backup_job(xml: &str) -> BackupJob {
    let socket = start_tags(xml, "server")
        .first()
        .and_then(|t| attr(t, "socket"));
    let exports = start_tags(xml, "disk")
        .into_iter()
        .filter(|t| attr(t, "backup").as_deref() != Some("no"))
        .filter_map(|t| {
            let name = attr(t, "name")?;
            let export = attr(t, "exportname").unwrap_or_else(|| name.clone());
            Some((name, export, attr(t, "exportbitmap")))
        })
        .collect();
    BackupJob { socket, exports }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='qemu' id='3'>
  <name>vm</name>
  <devices>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/a&amp;b.qcow2' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type=\"block\" device=\"disk\">
      <source dev=\"/dev/sdb\"/>
      <target dev=\"vdb\"/>
    </disk>
  </devices>
  <seclabel type='dynamic' model='selinux' relabel='yes'><label>x</label></seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+994</label>
    <imagelabel>+64055:+994</imagelabel>
  </seclabel>
</domain>";

    #[test]
    fn blkstat_gives_the_read_and_write_counters() {
        let out = "vda rd_req 412\nvda rd_bytes 9035776\nvda wr_req 120\nvda wr_bytes 491520\n\
                   vda flush_operations 40\nvda rd_total_times 73146410\n\
                   vda wr_total_times 50212345\nvda flush_total_times 9000000\n";
        assert_eq!(
            parse_blkstat(out),
            Some(IoTotals {
                read_ops: 412,
                read_ns: 73146410,
                write_ops: 120,
                write_ns: 50212345,
            })
        );
        assert_eq!(parse_blkstat("vda rd_req 1\n"), None);
    }

    #[test]
    fn domain_xml_gives_disks_and_the_qemu_user() {
        assert_eq!(
            parse_disks(DOMAIN),
            [
                Disk {
                    target: "vda".into(),
                    format: "qcow2".into(),
                    source: Some("/var/lib/a&b.qcow2".into()),
                },
                Disk {
                    target: "vdb".into(),
                    format: "raw".into(),
                    source: Some("/dev/sdb".into()),
                },
            ]
        );
        assert_eq!(
            parse_owner(DOMAIN),
            Some(Owner {
                uid: 64055,
                gid: 994
            })
        );
        assert_eq!(parse_owner("<domain/>"), None);
        assert_eq!(parse_disks("<disk"), []);
    }

    #[test]
    fn backup_job_xml_gives_socket_and_exports() {
        let xml = "<domainbackup mode='pull'>
  <incremental>ir-1</incremental>
  <server transport='unix' socket='/run/x/nbd.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='ir-1' exportname='vda' exportbitmap='backup-vda' index='4'>
      <driver type='qcow2'/>
    </disk>
    <disk name='vdb' backup='no'/>
  </disks>
</domainbackup>";
        assert_eq!(
            parse_backup_job(xml),
            BackupJob {
                socket: Some("/run/x/nbd.sock".into()),
                exports: vec![("vda".into(), "vda".into(), Some("backup-vda".into()))],
            }
        );
        assert_eq!(
            field("Job type:  Unbounded\nOperation:   Backup\n", "Operation"),
            Some("Backup")
        );
        assert_eq!(attr("<x a='1' ba='2'>", "a").as_deref(), Some("1"));
        assert_eq!(attr("<x ba='2'>", "a"), None);
        assert_eq!(escape("a<'&\">"), "a&lt;&apos;&amp;&quot;&gt;");
    }
}
