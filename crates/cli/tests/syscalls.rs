//! `lwk syscalls`: the table as people and scripts see it, and the
//! compatibility page generated from it.

use std::process::Command;

fn lwk(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_lwk")).args(args).output().unwrap();
    assert!(o.status.success(), "lwk {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn compatibility_page_is_current() {
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/syscalls.md");
    let want = lwk(&["syscalls", "--format", "markdown"]);
    let have = std::fs::read_to_string(page).unwrap_or_default();
    assert!(
        have == want,
        "docs/syscalls.md is not what the syscall table says: regenerate it with\n  \
         cargo run -p lwk -- syscalls --format markdown > docs/syscalls.md"
    );
}

#[test]
fn text_shows_rule_and_support_level() {
    let text = lwk(&["syscalls"]);
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}"))
            .to_string()
    };
    assert!(row("read").contains("lwk (Read)") && row("read").contains("supported"), "{}", row("read"));
    assert!(row("write").contains("delegated"));
    assert!(row("getpid").contains("local"));
    assert!(row("io_uring_setup").contains("refused") && row("io_uring_setup").contains("unsupported"));
    assert!(row("clone3").contains("partial"));
    let last = text.lines().last().unwrap();
    assert!(last.starts_with("383 system calls: "), "{last}");
}

#[test]
fn json_has_every_call_with_its_support() {
    let rows: serde_json::Value = serde_json::from_str(&lwk(&["syscalls", "--json"])).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 383);
    let by_name = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap();
    assert_eq!(by_name("mmap")["handler"], "Mmap");
    assert_eq!(by_name("mmap")["support"], "partial");
    assert!(by_name("mmap")["missing"].is_string());
    assert_eq!(by_name("ptrace")["support"], "unsupported");
    assert!(by_name("ptrace")["why_unsupported"].is_string());
    assert_eq!(by_name("openat")["runs"], "delegated");
    for r in rows {
        assert!(["supported", "partial", "unsupported"].contains(&r["support"].as_str().unwrap()), "{r}");
    }
}
