//! `recovery-cli key {list,add,remove} --store STORE`: the key slots of an
//! encrypted store, and where every command gets the store's secret.
//!
//! The secret that opens a store comes from the global `--key-file FILE`
//! (or `RECOVERY_KEY_FILE`), else `RECOVERY_PASSWORD`, else a prompt when
//! stdin is a terminal ([`install_secret_provider`]). A new secret (`init
//! --encrypt`, `key add`) comes from `--key-file` / `--new-key-file`, else
//! `RECOVERY_PASSWORD` / `RECOVERY_NEW_PASSWORD`, else a prompt typed twice.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context};
use store::crypto::{KdfParams, Secret};

use super::{open_store, StoreArg};
use crate::output;

/// Environment variable with the passphrase `key add` adds.
pub const NEW_PASSWORD_ENV: &str = "RECOVERY_NEW_PASSWORD";

static KEY_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The global `--key-file` (or `RECOVERY_KEY_FILE`).
pub fn key_file() -> Option<&'static Path> {
    KEY_FILE.get().and_then(|f| f.as_deref())
}

/// Make every store this process opens (the CLI's, the daemon's) take its
/// secret from `key_file`, the environment or one prompt.
pub fn install_secret_provider(key_file: Option<PathBuf>) {
    let _ = KEY_FILE.set(key_file.clone());
    let typed: Mutex<Option<String>> = Mutex::new(None);
    store::crypto::set_secret_provider(Arc::new(move |where_: &str| {
        if let Some(f) = &key_file {
            return Secret::key_file(f);
        }
        if let Some(s) = Secret::from_env()? {
            return Ok(s);
        }
        let mut typed = typed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = typed.as_ref() {
            return Secret::passphrase(p.clone());
        }
        if !std::io::stdin().is_terminal() {
            return Err(store::crypto::key_required(where_));
        }
        let p = rpassword::prompt_password(format!("Passphrase for store {where_}: ")).map_err(
            |e| {
                store::Error::io(
                    format!("Failed to read the passphrase of store {where_}"),
                    e,
                )
            },
        )?;
        let s = Secret::passphrase(p.clone())?;
        *typed = Some(p);
        Ok(s)
    }));
}

/// argon2id cost options of a new key.
#[derive(Debug, Clone, clap::Args)]
pub struct KdfArgs {
    /// argon2id memory of the new key (e.g. 64M); more is slower to guess.
    #[arg(long, default_value = "64M", value_parser = output::parse_size)]
    pub kdf_memory: u64,
    /// argon2id passes of the new key.
    #[arg(long, default_value_t = 3)]
    pub kdf_iterations: u32,
}

impl KdfArgs {
    /// Validated parameters.
    pub fn params(&self) -> anyhow::Result<KdfParams> {
        let kib = self.kdf_memory / 1024;
        if !(8 << 10..=4 << 20).contains(&kib) {
            bail!("--kdf-memory must be from 8M to 4G");
        }
        if !(1..=64).contains(&self.kdf_iterations) {
            bail!("--kdf-iterations must be from 1 to 64");
        }
        Ok(KdfParams {
            m_cost_kib: kib as u32,
            t_cost: self.kdf_iterations,
            p_cost: 1,
        })
    }
}

/// A new secret: the key file, else the passphrase in `env`, else one typed
/// twice on the terminal.
pub fn new_secret(key_file: Option<&Path>, env: &str, what: &str) -> anyhow::Result<Secret> {
    if let Some(f) = key_file {
        return Ok(Secret::key_file(f)?);
    }
    if let Ok(p) = std::env::var(env) {
        if !p.is_empty() {
            return Ok(Secret::passphrase(p)?);
        }
    }
    if !std::io::stdin().is_terminal() {
        bail!("{what} needs a key file or a passphrase: give the key file, or the passphrase in {env} (no terminal to type it on)");
    }
    let a =
        rpassword::prompt_password("New passphrase: ").context("Failed to read the passphrase")?;
    let b = rpassword::prompt_password("Repeat it: ").context("Failed to read the passphrase")?;
    if a != b {
        bail!("The passphrases differ");
    }
    Ok(Secret::passphrase(a)?)
}

/// Arguments of `key`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

/// `key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List the key slots.
    List {
        #[command(flatten)]
        store: StoreArg,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase (RECOVERY_NEW_PASSWORD or typed) or key file.
    Add {
        #[command(flatten)]
        store: StoreArg,
        /// The new key is this file's content (instead of a passphrase).
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Remove a key slot (never the last one).
    Remove {
        #[command(flatten)]
        store: StoreArg,
        /// The slot id (see `key list`).
        id: String,
    },
}

/// Run a `key` subcommand.
pub fn run(a: Args) -> anyhow::Result<()> {
    match a.action {
        Action::List { store, json } => {
            let s = open_store(&store.store)?;
            let slots = s.key_slots()?;
            if json {
                return output::json(&slots);
            }
            output::line(&format!(
                "{:<16}  {:<10}  {:<27}  {:<8}  HOST",
                "ID", "KIND", "CREATED", "KDF MEM"
            ))?;
            for k in slots {
                let kind = match k.kind {
                    store::crypto::SecretKind::Passphrase => "passphrase",
                    store::crypto::SecretKind::KeyFile => "key-file",
                };
                output::line(&format!(
                    "{:<16}  {:<10}  {:<27}  {:<8}  {}",
                    k.id,
                    kind,
                    k.created,
                    output::size(u64::from(k.kdf.m_cost_kib) << 10),
                    k.host
                ))?;
            }
            Ok(())
        }
        Action::Add {
            store,
            new_key_file,
            kdf,
        } => {
            let params = kdf.params()?;
            let s = open_store(&store.store)?;
            let secret = new_secret(new_key_file.as_deref(), NEW_PASSWORD_ENV, "key add")?;
            let id = s.add_key(&secret, &params)?;
            output::line(&format!("Added key {id}"))
        }
        Action::Remove { store, id } => {
            let s = open_store(&store.store)?;
            s.remove_key(&id)?;
            output::line(&format!("Removed key {id}"))
        }
    }
}
