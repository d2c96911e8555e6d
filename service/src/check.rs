//! The checks of a recovery drill, as written on the command line
//! (`recovery-cli drill --check`) and in a plan (`checks = [...]` per VM).
//!
//! | check           | passes when                                |
//! |-----------------|--------------------------------------------|
//! | `console:REGEX` | a serial console line matches              |
//! | `qga`           | qemu-guest-agent answers `guest-ping`      |
//! | `tcp:PORT`      | the guest accepts a connection on PORT     |
//! | `exec:CMD`      | `/bin/sh -c CMD` through the agent exits 0 |
//!
//! Only the spec lives here (parsed once, the same way for both); the
//! probes that run a check against a guest are the CLI's drill.

use regex::Regex;

/// Errors of parsing a check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid regex in check {spec:?}")]
    Regex {
        spec: String,
        #[source]
        source: regex::Error,
    },
    #[error("Invalid port in check {0:?}: expected 1-65535")]
    Port(String),
    #[error("Unknown check {0:?}: expected console:REGEX, qga, tcp:PORT or exec:CMD")]
    Unknown(String),
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One check of a drill.
#[derive(Debug, Clone)]
pub enum Check {
    /// A serial console line matches.
    Console(Regex),
    /// The guest agent answers `guest-ping`.
    Qga,
    /// A connection to this guest port is accepted.
    Tcp(u16),
    /// `/bin/sh -c CMD` through the guest agent exits 0.
    Exec(String),
}

impl Check {
    /// Parses `console:REGEX`, `qga`, `tcp:PORT` or `exec:CMD`.
    pub fn parse(s: &str) -> Result<Check> {
        match s.split_once(':') {
            Some(("console", re)) if !re.is_empty() => {
                Regex::new(re)
                    .map(Check::Console)
                    .map_err(|source| Error::Regex {
                        spec: s.to_owned(),
                        source,
                    })
            }
            Some(("tcp", port)) => match port.parse::<u16>() {
                Ok(p) if p > 0 => Ok(Check::Tcp(p)),
                _ => Err(Error::Port(s.to_owned())),
            },
            Some(("exec", cmd)) if !cmd.trim().is_empty() => Ok(Check::Exec(cmd.to_owned())),
            None if s == "qga" => Ok(Check::Qga),
            _ => Err(Error::Unknown(s.to_owned())),
        }
    }

    /// `console`, `qga`, `tcp` or `exec`.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Console(_) => "console",
            Check::Qga => "qga",
            Check::Tcp(_) => "tcp",
            Check::Exec(_) => "exec",
        }
    }

    /// Whether the check talks to the guest agent.
    pub fn needs_agent(&self) -> bool {
        matches!(self, Check::Qga | Check::Exec(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse() {
        assert!(matches!(
            Check::parse("console:PAYLOAD-OK"),
            Ok(Check::Console(_))
        ));
        assert!(matches!(
            Check::parse("console:("),
            Err(Error::Regex { .. })
        ));
        assert!(Check::parse("console:").is_err());
        assert!(matches!(Check::parse("qga"), Ok(Check::Qga)));
        assert!(Check::parse("qga:x").is_err());
        assert!(matches!(Check::parse("tcp:22"), Ok(Check::Tcp(22))));
        assert!(matches!(Check::parse("tcp:0"), Err(Error::Port(_))));
        assert!(Check::parse("tcp:70000").is_err());
        assert!(Check::parse("tcp:").is_err());
        assert!(matches!(Check::parse("exec:test -f /x"), Ok(Check::Exec(c)) if c == "test -f /x"));
        assert!(Check::parse("exec: ").is_err());
        let e = Check::parse("ping").unwrap_err().to_string();
        assert!(e.contains("expected console:REGEX, qga"), "{e}");
        assert!(Check::parse("qga").unwrap().needs_agent());
        assert_eq!(Check::parse("tcp:80").unwrap().kind(), "tcp");
    }
}
