//! `lwk syscalls`: the syscall table for people (a table, JSON, or the
//! Markdown compatibility page `docs/syscalls.md`).

use lwk_abi::syscalls::{Rule, Support, Syscall, TABLE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

/// What the table says of a call, in words: where it runs (and, for the
/// LWK's own code, the handler), its support level, and the notes.
fn runs(s: &Syscall) -> String {
    match s.rule {
        Rule::Handler(h) => format!("lwk ({h:?})"),
        Rule::DelegatePath(i) => format!("delegated (path in arg {i})"),
        Rule::Refuse(_) => "refused".into(),
        _ => s.place().into(),
    }
}

fn notes(s: &Syscall) -> String {
    let mut parts = Vec::new();
    match s.support {
        Support::Full => {}
        Support::Partial(t) => parts.push(t.to_string()),
        Support::Unsupported(t) => parts.push(format!("ENOSYS: {t}")),
    }
    if let Some(n) = s.note {
        parts.push(n.to_string());
    }
    parts.join("; ")
}

/// "N system calls: a local, b delegated, ...; x supported, y partial, z unsupported".
fn summary() -> String {
    let count = |f: &dyn Fn(&Syscall) -> bool| TABLE.iter().filter(|s| f(s)).count();
    let place = |p: &str| count(&|s| s.place() == p);
    let level = |l: &str| count(&|s| s.support.level() == l);
    format!(
        "{} system calls: {} local, {} delegated, {} in the LWK's own code, {} refused; \
         {} supported, {} partially supported, {} unsupported",
        TABLE.len(),
        place("local"),
        place("delegated"),
        place("lwk"),
        place("refused"),
        level("supported"),
        level("partial"),
        level("unsupported"),
    )
}

pub fn print(format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            let rows: Vec<_> = TABLE
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "nr": s.nr,
                        "name": s.name,
                        "runs": s.place(),
                        "handler": match s.rule { Rule::Handler(h) => Some(format!("{h:?}")), _ => None },
                        "support": s.support.level(),
                        "missing": match s.support { Support::Partial(t) => Some(t), _ => None },
                        "why_unsupported": match s.support { Support::Unsupported(t) => Some(t), _ => None },
                        "note": s.note,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Format::Text => {
            println!("{:>4}  {:<24} {:<30} {:<12} notes", "nr", "name", "runs", "support");
            for s in TABLE {
                println!("{:>4}  {:<24} {:<30} {:<12} {}", s.nr, s.name, runs(s), s.support.level(), notes(s));
            }
            println!("{}", summary());
        }
        Format::Markdown => print!("{}", markdown()),
    }
    Ok(())
}

/// The compatibility page, docs/syscalls.md.
pub fn markdown() -> String {
    let mut out = String::from(
        "# System calls under lwk\n\n\
         Generated from the syscall table (`crates/abi/src/syscalls.rs`) by\n\
         `lwk syscalls --format markdown > docs/syscalls.md`; a test fails when\n\
         this page and the table disagree. The LWK dispatches every trapped\n\
         call by this same table.\n\n\
         * **local**: executed as it is in the application process;\n\
         * **delegated**: executed by the proxy, which owns the application's\n  \
           descriptors and maps its memory at the same addresses;\n\
         * **lwk**: the LWK's own code (the handler named);\n\
         * **refused**: the application gets the error and the LWK says why on stderr.\n\n\
         Support: **supported** behaves as on Linux; **partial** works except for\n\
         what the notes say is missing; **unsupported** is refused.\n\n",
    );
    out += &summary();
    out += ".\n\n| nr | name | runs | support | notes |\n|---:|---|---|---|---|\n";
    for s in TABLE {
        out += &format!("| {} | `{}` | {} | {} | {} |\n", s.nr, s.name, runs(s), s.support.level(), notes(s));
    }
    out
}
