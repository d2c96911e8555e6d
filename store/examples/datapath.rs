//! The store's data paths alone, for CPU and wall measurements of one
//! backup or one restore (`perf stat -e task-clock` around it; drop the page
//! cache before for a cold run):
//!
//! ```sh
//! cargo build --release -p store --example datapath
//! target/release/examples/datapath ingest IMAGE STORE [--encrypt]   # fresh store
//! target/release/examples/datapath ingest-more IMAGE STORE [--encrypt]   # next backup
//! target/release/examples/datapath restore STORE TARGET [--encrypt]
//! ```
//!
//! Prints one line: seconds, MB/s and the operation's counters.

use std::path::Path;

use store::crypto::{KdfParams, Secret};
use store::{BackupOptions, RestoreOptions, Store};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: datapath ingest|ingest-more IMAGE STORE [--encrypt] | restore STORE TARGET [--encrypt]";
    let (Some(op), Some(a), Some(b)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let encrypt = args.iter().any(|a| a == "--encrypt");
    let secret = Secret::passphrase("bench").expect("secret");
    match op.as_str() {
        "ingest" | "ingest-more" => {
            let store = Path::new(b);
            if op == "ingest" && store.exists() {
                std::fs::remove_dir_all(store).expect("remove old store");
            }
            let s = if op == "ingest-more" {
                Store::open_keyed(store, encrypt.then_some(&secret)).expect("open")
            } else if encrypt {
                let kdf = KdfParams {
                    m_cost_kib: 8 << 10,
                    t_cost: 1,
                    p_cost: 1,
                };
                Store::init_encrypted(store, 64 << 10, &secret, &kdf).expect("init")
            } else {
                Store::init(store, 64 << 10).expect("init")
            };
            let st = s
                .backup("disk", Path::new(a), &BackupOptions::default())
                .expect("backup");
            println!(
                "ingest {:.3} s {:.0} MB/s read {} new {} chunks_new {} zero {}",
                st.seconds,
                st.image_size as f64 / st.seconds / 1e6,
                st.bytes_read,
                st.bytes_new,
                st.chunks_new,
                st.chunks_zero
            );
        }
        "restore" => {
            let s = Store::open_keyed(Path::new(a), encrypt.then_some(&secret)).expect("open");
            let threads = std::env::var("DATAPATH_THREADS")
                .ok()
                .map(|t| t.parse().expect("DATAPATH_THREADS"));
            let opts = RestoreOptions {
                force: true,
                threads,
                ..Default::default()
            };
            let st = s.restore("disk", Path::new(b), &opts).expect("restore");
            println!(
                "restore {:.3} s {:.0} MB/s written {} zero {}",
                st.seconds,
                st.image_size as f64 / st.seconds / 1e6,
                st.bytes_written,
                st.chunks_zero
            );
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
