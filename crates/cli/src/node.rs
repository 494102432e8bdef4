//! `lwk node`: the node daemon and its cluster key.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use lwk_node::key::DEFAULT_KEY_FILE;

#[derive(clap::Subcommand)]
pub enum NodeCmd {
    /// Run the node daemon: receive applications that other nodes migrate
    /// here, restore them, and run them once their source lets go.
    Serve {
        /// Address to listen on (the cluster network's).
        #[arg(long, default_value = "0.0.0.0:7070")]
        listen: SocketAddr,
        /// The cluster key (a file only root reads).
        #[arg(long, default_value = DEFAULT_KEY_FILE)]
        key: PathBuf,
        /// Where received applications are kept while they run.
        #[arg(long, default_value = "/run/lwk/node")]
        state_dir: PathBuf,
        /// Seconds a source may stay silent before its migration fails here.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// The interface on which migrated applications' service addresses
        /// come up (`lwk migrate --address`).
        #[arg(long)]
        service_dev: Option<String>,
    },
    /// Make a new cluster key (copy it to every node).
    Keygen {
        #[arg(default_value = DEFAULT_KEY_FILE)]
        file: PathBuf,
    },
}

pub fn main(cmd: NodeCmd) -> Result<i32> {
    match cmd {
        NodeCmd::Serve { listen, key, state_dir, timeout, service_dev } => {
            let key_file = std::fs::canonicalize(&key).unwrap_or(key.clone());
            let key = lwk_node::key::load(&key)?;
            let lwk = std::env::current_exe().context("cannot find the lwk binary's own path")?;
            let timeout = std::time::Duration::from_secs(timeout);
            let config = lwk_node::server::Config { listen, key, key_file, state_dir, lwk, timeout, service_dev };
            lwk_node::server::serve(config)?;
            Ok(0)
        }
        NodeCmd::Keygen { file } => {
            lwk_node::key::generate(&file)?;
            println!("{}: a new cluster key; copy it to every node (mode 600, owned by root)", file.display());
            Ok(0)
        }
    }
}
