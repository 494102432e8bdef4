//! `lwk ps`: the lwk applications on this node.

use anyhow::Result;
use lwk_migrate::app::{App, AppInfo};

pub fn main(json: bool) -> Result<i32> {
    let apps: Vec<AppInfo> = App::list().iter().map(App::info).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&apps)?);
        return Ok(0);
    }
    println!(
        "{:>8} {:>8} {:>8} {:>7} {:>10}  {:<34} {:>5}  COMMAND",
        "PID", "PROXY", "PARENT", "THREADS", "MEMORY", "DESCRIPTORS", "TCP"
    );
    for a in &apps {
        let fds = a.descriptors.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
        println!(
            "{:>8} {:>8} {:>8} {:>7} {:>10}  {:<34} {:>5}  {}",
            a.pid,
            a.proxy_pid,
            a.parent_pid,
            a.threads,
            mib(a.memory_bytes),
            fds,
            a.tcp_established,
            a.command
        );
    }
    Ok(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}
