//! Running the network tools (`ip`, `nft`, `iptables`) this crate and the
//! cluster's drive.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Run `program` with `args` (and `input` on its standard input); its
/// standard output, or its error naming the command.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program} (install {})", package_of(program)))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .with_context(|| format!("talking to {program}"))?;
    }
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The Debian package that has `program`.
fn package_of(program: &str) -> &str {
    match program {
        "nft" => "nftables",
        "ip" | "tc" | "bridge" => "iproute2",
        "iptables" | "iptables-restore" => "iptables",
        other => other,
    }
}
