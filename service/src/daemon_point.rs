//! Members served by our daemon (`disks = [{ drive, daemon }]`): the
//! member snapshot is the daemon's protection point, cut on demand inside
//! the group's window (the control socket's `point` request, see
//! `control`), then waited for (`point-wait`) once the guests run again.
//!
//! ```text
//!  before the window: status of every daemon: reachable, protecting, and
//!                     writing its points as <service>-<vm>-<drive>;
//!                     then a point on each, waited for (settle_all)
//!  in the window:     `point` on every daemon at once (one thread each);
//!                     each answers once its cut is taken
//!  after the window:  `point-wait` on every daemon at once; each answers
//!                     with NAME@ID once the point is in the store
//!                     (which must be the plan's store)
//! ```
//! A point whose group fails is kept: it is an ordinary protection point,
//! the parent of the daemon's next one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use control::PointTaken;
use store::Store;

/// How long a daemon may take to cut its point (it first finishes a
/// point it is copying).
pub const CUT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to write its point into the store.
pub const POINT_TIMEOUT: Duration = Duration::from_secs(3600);
/// One `point-wait` request waits this long, then abort is checked.
const WAIT_SLICE: Duration = Duration::from_secs(2);

/// Errors of a daemon-served member.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot reach daemon {path}")]
    Status {
        path: PathBuf,
        #[source]
        source: control::Error,
    },
    #[error("Daemon {path} does not protect its disk: start it with instant-boot --protect --protect-name {want}, or serve --name {want}")]
    NotProtecting { path: PathBuf, want: String },
    #[error("Daemon {path} writes its points as {has}, but this member is {want}: start it with --protect-name {want} (serve: --name {want})")]
    Name {
        path: PathBuf,
        has: String,
        want: String,
    },
    #[error("Daemon {path}: point request failed")]
    Cut {
        path: PathBuf,
        #[source]
        source: control::Error,
    },
    #[error("Daemon {path}: point {cut} did not complete")]
    Point {
        path: PathBuf,
        cut: u64,
        #[source]
        source: control::Error,
    },
    #[error("Daemon {path} wrote point {snapshot}, which the plan's store does not hold: the daemon must use the plan's store")]
    OtherStore {
        path: PathBuf,
        snapshot: String,
        #[source]
        source: store::Error,
    },
    #[error("Interrupted while waiting for daemon {path}")]
    Interrupted { path: PathBuf },
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One member served by a daemon.
#[derive(Debug)]
pub struct DaemonMember {
    /// Index of the member in the plan's member list.
    pub index: usize,
    /// The daemon's control socket.
    pub path: PathBuf,
    /// The member snapshot name the daemon must write.
    pub name: String,
    /// Disk size, from the daemon's status.
    pub size: u64,
    /// The cut, once taken.
    pub cut: Option<PointTaken>,
    /// When the cut was taken.
    pub cut_at: Option<Instant>,
    /// The complete point (`snapshot` set).
    pub done: Option<PointTaken>,
    /// Seconds from the cut to the point complete.
    pub seconds: f64,
}

impl DaemonMember {
    pub fn new(index: usize, path: &Path, name: &str) -> DaemonMember {
        DaemonMember {
            index,
            path: path.to_path_buf(),
            name: name.to_owned(),
            size: 0,
            cut: None,
            cut_at: None,
            done: None,
            seconds: 0.0,
        }
    }

    /// The daemon answers, protects, and writes points under our name.
    pub fn check(&mut self) -> Result<()> {
        let status = control::fetch_status(&self.path).map_err(|source| Error::Status {
            path: self.path.clone(),
            source,
        })?;
        let Some(p) = status.protection else {
            return Err(Error::NotProtecting {
                path: self.path.clone(),
                want: self.name.clone(),
            });
        };
        if p.name != self.name {
            return Err(Error::Name {
                path: self.path.clone(),
                has: p.name,
                want: self.name.clone(),
            });
        }
        self.size = status.bytes_total;
        Ok(())
    }

    /// Asks for the point now; returns once its cut is taken, waiting at
    /// most `timeout`.
    fn take(&mut self, timeout: Duration) -> Result<()> {
        let cut = control::take_point(&self.path, timeout).map_err(|source| Error::Cut {
            path: self.path.clone(),
            source,
        })?;
        if cut.name != self.name {
            return Err(Error::Name {
                path: self.path.clone(),
                has: cut.name,
                want: self.name.clone(),
            });
        }
        self.cut = Some(cut);
        self.cut_at = Some(Instant::now());
        Ok(())
    }

    /// Waits for the cut's point to be complete, and checks that the
    /// plan's store holds it.
    fn wait(&mut self, store: &Store, abort: &AtomicBool) -> Result<()> {
        let cut = self.cut.as_ref().expect("cut taken").cut;
        let deadline = Instant::now() + POINT_TIMEOUT;
        let done = loop {
            if abort.load(Ordering::Relaxed) {
                return Err(Error::Interrupted {
                    path: self.path.clone(),
                });
            }
            match control::wait_point(&self.path, cut, WAIT_SLICE) {
                // The daemon's own deadline passed: ask again until ours.
                Err(control::Error::Refused(m))
                    if m.starts_with("timed out") && Instant::now() < deadline => {}
                r => {
                    break r.map_err(|source| Error::Point {
                        path: self.path.clone(),
                        cut,
                        source,
                    })?
                }
            }
        };
        let snapshot = done.snapshot.clone().unwrap_or_default();
        store
            .resolve(&snapshot)
            .map_err(|source| Error::OtherStore {
                path: self.path.clone(),
                snapshot: snapshot.clone(),
                source,
            })?;
        self.seconds = self.cut_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.done = Some(done);
        Ok(())
    }

    /// `NAME@ID` of the complete point.
    pub fn snapshot(&self) -> Option<&str> {
        self.done.as_ref().and_then(|d| d.snapshot.as_deref())
    }
}

/// Before the window: a point on every daemon, waited for, so that no
/// daemon is still copying a point (a first full read can take minutes)
/// when the window asks for its cut, which would wait for that copy while
/// the guests are held still. The daemon's next scheduled point is then an
/// interval away, and the point cut in the window holds only what changed
/// since.
pub fn settle_all(
    members: &mut [DaemonMember],
    store: &Store,
    abort: &AtomicBool,
) -> std::result::Result<(), (usize, Error)> {
    each(members, |m| {
        m.take(POINT_TIMEOUT)?;
        m.wait(store, abort)?;
        m.cut = None;
        m.done = None;
        Ok(())
    })
}

/// Cuts every member's point at once; the first failure, by member.
pub fn cut_all(members: &mut [DaemonMember]) -> std::result::Result<(), (usize, Error)> {
    each(members, |m| m.take(CUT_TIMEOUT))
}

/// Waits for every member's point at once; the first failure, by member.
pub fn wait_all(
    members: &mut [DaemonMember],
    store: &Store,
    abort: &AtomicBool,
) -> std::result::Result<(), (usize, Error)> {
    each(members, |m| m.wait(store, abort))
}

/// Runs `f` on every member, one thread each (a handful of daemons: one
/// request each, mostly waiting).
fn each(
    members: &mut [DaemonMember],
    f: impl Fn(&mut DaemonMember) -> Result<()> + Sync,
) -> std::result::Result<(), (usize, Error)> {
    let f = &f;
    let results: Vec<(usize, Result<()>)> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter_mut()
            .map(|m| s.spawn(move || (m.index, f(m))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a daemon request thread panicked"))
            .collect()
    });
    for (index, r) in results {
        r.map_err(|e| (index, e))?;
    }
    Ok(())
}
