//! The SPANK callbacks. Which runs where (spank.h):
//!
//! * srun/sbatch/salloc (local, allocator): `init` registers the options, the
//!   option callbacks check their syntax, `init_post_opt` checks the site
//!   policy for the submitting user: errors stop the submission.
//! * slurmstepd (remote), as root: `init_post_opt` creates the partition and
//!   the step's statistics directory; `task_exit` notes each task's status;
//!   `exit` destroys the partition and writes the accounting.
//! * the task process, as the user, just before slurmstepd's execve:
//!   `task_init` points the task's argv[0] at `lwk-slurm-exec` and passes the
//!   real argv[0], partition and statistics file in the task's environment.
//!   The helper then execs `lwk run --partition P --stats-json F -- ARGV`.
//!   This keeps everything slurmstepd does after the plugins (TaskProlog,
//!   TMPDIR, the user's rlimits) as it is, which an execv from task_init would
//!   skip; Slurm 22.05 has no spank_prepend_task_argv.
//! * slurmd's epilog (job script context), as root: `job_epilog` destroys the
//!   job's partitions and folds in statistics that a killed slurmstepd left.
//!
//! Errors found in slurmstepd are written to the task's stderr from task_init
//! (which then fails the task): an error from init_post_opt itself would only
//! reach the user as a generic "launch failed".

use std::ffi::{c_char, c_int, CStr, CString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lwk_partition::{format_cpu_list, parse_cpu_list, parse_size};

use crate::accounting::{self, StepRecord, TaskRecord};
use crate::cpus::CpuRequest;
use crate::ffi::{self, SpankT};
use crate::site::{format_size, SiteConfig};
use crate::{env, Error};

#[no_mangle]
pub static plugin_name: [u8; 4] = *b"lwk\0";
#[no_mangle]
pub static plugin_type: [u8; 6] = *b"spank\0";
#[no_mangle]
pub static plugin_version: u32 = match u32::from_str_radix(env!("LWK_SLURM_VERSION_NUMBER"), 10) {
    Ok(v) => v,
    Err(_) => 0,
};
#[no_mangle]
pub static spank_plugin_version: u32 = 1;

const OPT_LWK: c_int = 1;
const OPT_CPUS: c_int = 2;
const OPT_MEM: c_int = 3;

/// A step this slurmstepd runs on a partition.
#[derive(Debug, Clone)]
struct ActiveStep {
    job_id: u32,
    uid: u32,
    step: String,
    partition: String,
    /// False when the step shares an enclosing step's partition.
    owned: bool,
    cpus: String,
    mem: u64,
    stats_dir: PathBuf,
}

#[derive(Default)]
struct State {
    site: Option<SiteConfig>,
    lwk: bool,
    cpus: Option<CpuRequest>,
    mem: Option<u64>,
    step: Option<ActiveStep>,
    /// An error found in slurmstepd, told to the user from task_init.
    deferred_error: Option<String>,
    /// (global task id, wait status) from task_exit.
    task_status: Vec<(u32, i32)>,
}

static STATE: Mutex<State> = Mutex::new(State {
    site: None,
    lwk: false,
    cpus: None,
    mem: None,
    step: None,
    deferred_error: None,
    task_status: Vec::new(),
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The plugin's plugstack.conf arguments.
fn plugin_args(ac: c_int, av: *mut *mut c_char) -> Vec<String> {
    if av.is_null() || ac <= 0 {
        return Vec::new();
    }
    (0..ac as usize)
        .filter_map(|i| {
            // SAFETY: Slurm passes an array of ac pointers in av (not null,
            // checked above), and i < ac.
            let p = unsafe { *av.add(i) };
            // SAFETY: each non-null entry is a NUL-terminated C string that
            // Slurm keeps for the duration of the callback; it is copied here.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        })
        .collect()
}

/// The site configuration, parsed once per process from the callback's arguments.
fn site(ac: c_int, av: *mut *mut c_char) -> Result<SiteConfig, Error> {
    let mut st = state();
    if let Some(cfg) = &st.site {
        return Ok(cfg.clone());
    }
    let cfg = SiteConfig::from_args(&plugin_args(ac, av))?;
    st.site = Some(cfg.clone());
    Ok(cfg)
}

fn leak_cstr(s: &str) -> *const c_char {
    CString::new(s).unwrap_or_default().into_raw()
}

extern "C" fn option_cb(val: c_int, optarg: *const c_char, _remote: c_int) -> c_int {
    let arg = if optarg.is_null() {
        String::new()
    } else {
        // SAFETY: Slurm passes the option's argument as a C string.
        unsafe { CStr::from_ptr(optarg) }.to_string_lossy().into_owned()
    };
    let parsed = match val {
        OPT_LWK => Ok(()),
        OPT_CPUS => CpuRequest::parse(&arg).map(|r| state().cpus = Some(r)),
        OPT_MEM => {
            parse_size(&arg).map(|m| state().mem = Some(m)).map_err(|e| Error::Invalid(format!("--lwk-mem={arg}: {e}")))
        }
        _ => Ok(()),
    };
    match parsed {
        Ok(()) => {
            // Any of the options asks for the LWK.
            state().lwk = true;
            0
        }
        Err(e) => {
            ffi::log_error(&format!("lwk: {e}"));
            -1
        }
    }
}

fn register_options(sp: SpankT) -> Result<(), Error> {
    let opts = [
        ("lwk", None, "Run the tasks on an LWK partition under `lwk run` (lwk plugin)", OPT_LWK),
        (
            "lwk-cpus",
            Some("N|LIST"),
            "LWK partition CPUs: N of the job's CPUs on each node, or exactly LIST (implies --lwk)",
            OPT_CPUS,
        ),
        ("lwk-mem", Some("SIZE"), "LWK partition memory per node, e.g. 256M, 2G (implies --lwk)", OPT_MEM),
    ];
    for (name, arginfo, usage, val) in opts {
        let mut opt = ffi::SpankOption {
            name: leak_cstr(name),
            arginfo: arginfo.map_or(std::ptr::null(), leak_cstr),
            usage: leak_cstr(usage),
            has_arg: arginfo.is_some() as c_int,
            val,
            cb: Some(option_cb),
        };
        // SAFETY: a complete spank_option whose strings live for the process.
        let rc = unsafe { ffi::spank_option_register(sp, &mut opt) };
        if rc != ffi::ESPANK_SUCCESS {
            return Err(Error::Command(format!("registering --{name} failed (spank error {rc})")));
        }
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn slurm_spank_init(sp: SpankT, ac: c_int, av: *mut *mut c_char) -> c_int {
    // SAFETY: spank_context takes nothing and only reads the state of the
    // Slurm program that loaded this plugin and calls this callback.
    let ctx = unsafe { ffi::spank_context() };
    let cfg = match site(ac, av) {
        Ok(cfg) => cfg,
        Err(e) => {
            ffi::log_error(&e.to_string());
            return -1;
        }
    };
    let _ = cfg;
    if matches!(ctx, ffi::S_CTX_LOCAL | ffi::S_CTX_REMOTE | ffi::S_CTX_ALLOCATOR) {
        if let Err(e) = register_options(sp) {
            ffi::log_error(&format!("lwk: {e}"));
            return -1;
        }
    }
    0
}

#[no_mangle]
pub extern "C" fn slurm_spank_init_post_opt(sp: SpankT, ac: c_int, av: *mut *mut c_char) -> c_int {
    if !state().lwk {
        return 0;
    }
    let cfg = match site(ac, av) {
        Ok(cfg) => cfg,
        Err(e) => {
            ffi::log_error(&e.to_string());
            return -1;
        }
    };
    // SAFETY: as in slurm_spank_init: no arguments, called from a Slurm callback.
    let ctx = unsafe { ffi::spank_context() };
    if ctx == ffi::S_CTX_REMOTE {
        match prepare_step(sp, &cfg) {
            Ok(step) => state().step = step,
            Err(e) => {
                let msg = format!("lwk: {e}");
                ffi::log_error(&msg);
                state().deferred_error = Some(msg);
            }
        }
        return 0;
    }
    // srun, sbatch, salloc: what can be checked before the job exists.
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if let Err(e) = check_user(&cfg, uid, gid) {
        ffi::log_error(&format!("lwk: {e}"));
        return -1;
    }
    let mem = state().mem.unwrap_or(cfg.default_mem);
    let node_max = cfg.max_mem(0, node_memory());
    if mem > node_max {
        ffi::log_error(&format!(
            "lwk: --lwk-mem={}: more than this site allows ({} = max_mem_fraction {} of a node's {})",
            format_size(mem),
            format_size(node_max),
            cfg.max_mem_fraction,
            format_size(node_memory())
        ));
        return -1;
    }
    0
}

/// Names of `uid` and of all its groups.
fn user_and_groups(uid: u32, gid: u32) -> Result<(String, Vec<String>), Error> {
    // SAFETY: getpwuid_r/getgrgid_r/getgrouplist with buffers we own and sizes we pass.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let mut buf = vec![0 as c_char; 16384];
        if libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) != 0 || out.is_null() {
            return Err(Error::Policy(format!("user {uid} has no passwd entry on this node")));
        }
        let name = CStr::from_ptr(pw.pw_name).to_string_lossy().into_owned();
        let mut ngroups: c_int = 256;
        let mut gids = vec![0 as libc::gid_t; ngroups as usize];
        if libc::getgrouplist(pw.pw_name, gid, gids.as_mut_ptr(), &mut ngroups) < 0 {
            gids.resize(ngroups.max(0) as usize, 0);
            libc::getgrouplist(pw.pw_name, gid, gids.as_mut_ptr(), &mut ngroups);
        }
        gids.truncate(ngroups.max(0) as usize);
        let mut groups = Vec::new();
        for g in gids {
            let mut gr: libc::group = std::mem::zeroed();
            let mut gout: *mut libc::group = std::ptr::null_mut();
            let mut gbuf = vec![0 as c_char; 65536];
            if libc::getgrgid_r(g, &mut gr, gbuf.as_mut_ptr(), gbuf.len(), &mut gout) == 0 && !gout.is_null() {
                groups.push(CStr::from_ptr(gr.gr_name).to_string_lossy().into_owned());
            }
        }
        Ok((name, groups))
    }
}

fn check_user(cfg: &SiteConfig, uid: u32, gid: u32) -> Result<(), Error> {
    if cfg.allow_users.is_empty() && cfg.allow_groups.is_empty() {
        return Ok(());
    }
    let (name, groups) = user_and_groups(uid, gid)?;
    if cfg.allows(&name, &groups) {
        return Ok(());
    }
    Err(Error::Policy(format!(
        "user {name} may not use --lwk on this cluster (allowed users: {}; allowed groups: {})",
        if cfg.allow_users.is_empty() { "none".into() } else { cfg.allow_users.join(",") },
        if cfg.allow_groups.is_empty() { "none".into() } else { cfg.allow_groups.join(",") },
    )))
}

/// MemTotal of this node in bytes (0 if unreadable).
fn node_memory() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn get_u32(sp: SpankT, item: c_int) -> Option<u32> {
    let mut v: u32 = 0;
    // SAFETY: these items take a uint32_t* (uid_t, gid_t are 32-bit too).
    (unsafe { ffi::spank_get_item(sp, item, &mut v as *mut u32) } == ffi::ESPANK_SUCCESS).then_some(v)
}

/// The job's CPUs on this node: S_JOB_ALLOC_CORES, else this process's affinity.
fn allocated_cpus(sp: SpankT) -> Result<Vec<usize>, Error> {
    let mut list: *const c_char = std::ptr::null();
    // SAFETY: S_JOB_ALLOC_CORES takes a char**; Slurm keeps the string.
    let rc = unsafe { ffi::spank_get_item(sp, ffi::S_JOB_ALLOC_CORES, &mut list as *mut *const c_char) };
    if rc == ffi::ESPANK_SUCCESS && !list.is_null() {
        // SAFETY: on success the item is a NUL-terminated string that Slurm
        // owns and keeps for the step; it is copied here.
        let text = unsafe { CStr::from_ptr(list) }.to_string_lossy().into_owned();
        if !text.is_empty() {
            return parse_cpu_list(&text).map_err(|e| Error::Io(format!("the job's CPUs from Slurm: {e}")));
        }
    }
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is valid
    // (the empty set).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most the size given, which is that
    // of `set`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(Error::Io("cannot tell the job's CPUs on this node".into()));
    }
    // SAFETY: CPU_ISSET reads bit c of the set; c < CPU_SETSIZE, its size in bits.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

fn job_env(sp: SpankT, name: &str) -> Option<String> {
    let mut argv: *const *const c_char = std::ptr::null();
    // SAFETY: S_JOB_ENV takes a char***; the array is NULL-terminated.
    if unsafe { ffi::spank_get_item(sp, ffi::S_JOB_ENV, &mut argv as *mut *const *const c_char) } != ffi::ESPANK_SUCCESS
        || argv.is_null()
    {
        return None;
    }
    let prefix = format!("{name}=");
    let mut i = 0;
    loop {
        // SAFETY: argv is the job's NULL-terminated environment array (not
        // null, checked above) and entries up to its NULL are read, no further.
        let p = unsafe { *argv.add(i) };
        if p.is_null() {
            return None;
        }
        // SAFETY: every entry before the NULL is a NUL-terminated "NAME=value"
        // string that slurmstepd keeps for the step.
        let entry = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        if let Some(v) = entry.strip_prefix(&prefix) {
            return Some(v.to_string());
        }
        i += 1;
    }
}

/// Runs a command with a time limit; Ok(stdout) on success, else its stderr.
fn run(program: &Path, args: &[String], limit: Duration) -> Result<String, Error> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command(format!("cannot run {shown}: {e}")))?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let readers = std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        if let Some(s) = out.as_mut() {
            let _ = s.read_to_string(&mut o);
        }
        if let Some(s) = err.as_mut() {
            let _ = s.read_to_string(&mut e);
        }
        (o, e)
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Command(format!("{shown}: no answer within {}s, killed", limit.as_secs())));
            }
            Err(e) => return Err(Error::Command(format!("{shown}: {e}"))),
        }
    };
    let (stdout, stderr) = readers.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(Error::Command(format!("{shown} failed ({status}): {}", stderr.trim())))
    }
}

const LWK_LIMIT: Duration = Duration::from_secs(60);

/// slurmstepd, root: create the step's partition and statistics directory.
fn prepare_step(sp: SpankT, cfg: &SiteConfig) -> Result<Option<ActiveStep>, Error> {
    let job_id = get_u32(sp, ffi::S_JOB_ID).ok_or_else(|| Error::Io("no job id".into()))?;
    let step_id = get_u32(sp, ffi::S_JOB_STEPID).ok_or_else(|| Error::Io("no step id".into()))?;
    let uid = get_u32(sp, ffi::S_JOB_UID).ok_or_else(|| Error::Io("no job uid".into()))?;
    let gid = get_u32(sp, ffi::S_JOB_GID).ok_or_else(|| Error::Io("no job gid".into()))?;
    let step = match step_id {
        // The extern step holds no user task; the interactive step is salloc's shell.
        ffi::SLURM_EXTERN_CONT | ffi::SLURM_INTERACTIVE_STEP => return Ok(None),
        ffi::SLURM_BATCH_SCRIPT => "batch".to_string(),
        n => n.to_string(),
    };
    check_user(cfg, uid, gid)?;
    let stats_dir = cfg.state_dir.join(format!("{job_id}.{step}"));
    let (req_cpus, req_mem) = {
        let st = state();
        (st.cpus.clone().unwrap_or(CpuRequest::Count(1)), st.mem.unwrap_or(cfg.default_mem))
    };

    // A step started from inside an LWK task shares that task's partition.
    if let Some(outer) = job_env(sp, env::PARTITION) {
        if outer.starts_with(&format!("slurm-{job_id}.")) && cfg.partitions_dir.join(&outer).exists() {
            make_stats_dir(cfg, &stats_dir, uid, gid)?;
            ffi::log_info(&format!("lwk: step {job_id}.{step} runs on the enclosing partition {outer}"));
            return Ok(Some(ActiveStep {
                job_id,
                uid,
                step,
                partition: outer,
                owned: false,
                cpus: String::new(),
                mem: 0,
                stats_dir,
            }));
        }
    }

    let mut job_mem_mb: u64 = 0;
    // SAFETY: S_JOB_ALLOC_MEM takes a uint64_t*.
    unsafe { ffi::spank_get_item(sp, ffi::S_JOB_ALLOC_MEM, &mut job_mem_mb as *mut u64) };
    let max = cfg.max_mem(job_mem_mb << 20, node_memory());
    if req_mem > max {
        return Err(Error::Policy(format!(
            "--lwk-mem={}: at most {} may be used here (max_mem_fraction {} of the job's {} on this node)",
            format_size(req_mem),
            format_size(max),
            cfg.max_mem_fraction,
            if job_mem_mb > 0 {
                format_size(job_mem_mb << 20)
            } else {
                format!("node memory {}", format_size(node_memory()))
            }
        )));
    }
    let cpus = format_cpu_list(&req_cpus.choose(&allocated_cpus(sp)?)?);
    let partition = format!("slurm-{job_id}.{step}");
    make_stats_dir(cfg, &stats_dir, uid, gid)?;
    let mut args: Vec<String> = ["partition", "create", &partition, "--cpus", &cpus, "--mem", &format_size(req_mem)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--owner".into(), uid.to_string()]);
    if let Some(h) = &cfg.hugepages {
        args.extend(["--hugepages".into(), h.clone()]);
    }
    if let Err(e) = run(&cfg.lwk, &args, LWK_LIMIT) {
        remove_stats_dir(cfg, &stats_dir);
        return Err(Error::Command(format!("creating partition {partition} (CPUs {cpus}) failed: {e}")));
    }
    ffi::log_info(&format!("lwk: created partition {partition} cpus={cpus} mem={}", format_size(req_mem)));
    Ok(Some(ActiveStep { job_id, uid, step, partition, owned: true, cpus, mem: req_mem, stats_dir }))
}

fn make_stats_dir(cfg: &SiteConfig, dir: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    let io = |what: &str, p: &Path, e: std::io::Error| Error::Io(format!("{what} {}: {e}", p.display()));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&cfg.state_dir)
        .map_err(|e| io("creating", &cfg.state_dir, e))?;
    let _ = fs::remove_dir_all(dir);
    fs::DirBuilder::new().mode(0o700).create(dir).map_err(|e| io("creating", dir, e))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| io("chown", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io("chmod", dir, e))
}

fn remove_stats_dir(cfg: &SiteConfig, dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    // Leaves nothing under /run/lwk once the last step is gone.
    let _ = fs::remove_dir(&cfg.state_dir);
}

fn stats_file(dir: &Path, task: u32) -> PathBuf {
    dir.join(format!("task-{task}.json"))
}

/// In the task process, as the user, just before slurmstepd's execve.
#[no_mangle]
pub extern "C" fn slurm_spank_task_init(sp: SpankT, ac: c_int, av: *mut *mut c_char) -> c_int {
    let (step, deferred) = {
        let st = state();
        (st.step.clone(), st.deferred_error.clone())
    };
    if let Some(msg) = deferred {
        // The task's stderr goes to the user (srun's terminal, the job's output).
        let _ = writeln!(std::io::stderr(), "{msg}");
        return -1;
    }
    let Some(step) = step else { return 0 };
    let cfg = match site(ac, av) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lwk: {e}");
            return -1;
        }
    };
    match wrap_task(sp, &cfg, &step) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lwk: cannot start the task under lwk: {e}");
            -1
        }
    }
}

fn wrap_task(sp: SpankT, cfg: &SiteConfig, step: &ActiveStep) -> Result<(), Error> {
    let task = get_u32(sp, ffi::S_TASK_GLOBAL_ID).ok_or_else(|| Error::Io("no task id".into()))?;
    let mut argc: c_int = 0;
    let mut argv: *mut *mut c_char = std::ptr::null_mut();
    // SAFETY: S_JOB_ARGV takes (int*, char***); slurmstepd's job->argv, which
    // is this task's argv (not with --multi-prog, which is refused below).
    let rc = unsafe { ffi::spank_get_item(sp, ffi::S_JOB_ARGV, &mut argc as *mut c_int, &mut argv) };
    if rc != ffi::ESPANK_SUCCESS || argv.is_null() || argc < 1 {
        return Err(Error::Io(format!("no task argv (spank error {rc})")));
    }
    // SAFETY: argc >= 1 entries.
    let argv0 = unsafe { *argv };
    if argv0.is_null() {
        return Err(Error::Io("empty task argv".into()));
    }
    // SAFETY: argv[0], not null, is the task's NUL-terminated program name,
    // which slurmstepd keeps until the task's execve; it is copied here.
    let argv0_str = unsafe { CStr::from_ptr(argv0) }.to_string_lossy().into_owned();
    if job_env(sp, "SLURM_MULTI_PROG").is_some() {
        return Err(Error::Policy("--lwk does not support --multi-prog".into()));
    }
    let helper = cfg.exec_helper.to_string_lossy().into_owned();
    if argv0_str == helper {
        return Ok(()); // already wrapped (task_init called twice is not expected, but harmless)
    }
    let stats = stats_file(&step.stats_dir, task);
    let set = |k: &str, v: &str| -> Result<(), Error> {
        let (k, v) = (CString::new(k).unwrap_or_default(), CString::new(v).unwrap_or_default());
        // SAFETY: two valid C strings; spank_setenv copies them into the task's environment.
        match unsafe { ffi::spank_setenv(sp, k.as_ptr(), v.as_ptr(), 1) } {
            ffi::ESPANK_SUCCESS => Ok(()),
            e => Err(Error::Io(format!("spank_setenv {k:?} failed (spank error {e})"))),
        }
    };
    set(env::PARTITION, &step.partition)?;
    if step.step == "batch" {
        // The batch script itself runs on Linux's CPUs: it is orchestration,
        // and its steps (srun) run their tasks under lwk in the partition
        // made for the job's batch step, which one `lwk run` at a time holds
        // (as with McKernel, where a script runs `mcexec ./app`).
        return Ok(());
    }
    set(env::LWK, &cfg.lwk.to_string_lossy())?;
    set(env::STATS, &stats.to_string_lossy())?;
    set(env::ARGV0, &argv0_str)?;
    // SAFETY: replaces argv[0] in this (forked, about to exec) task process's
    // copy of the argv array with a string that lives until the execve.
    unsafe { *argv = CString::new(helper).unwrap_or_default().into_raw() };
    Ok(())
}

/// slurmstepd, root, for each task that ended.
#[no_mangle]
pub extern "C" fn slurm_spank_task_exit(sp: SpankT, ac: c_int, av: *mut *mut c_char) -> c_int {
    if state().step.is_none() {
        return 0;
    }
    let task = get_u32(sp, ffi::S_TASK_GLOBAL_ID);
    let mut status: c_int = 0;
    // SAFETY: S_TASK_EXIT_STATUS takes an int*.
    let rc = unsafe { ffi::spank_get_item(sp, ffi::S_TASK_EXIT_STATUS, &mut status as *mut c_int) };
    if let (Some(task), ffi::ESPANK_SUCCESS) = (task, rc) {
        state().task_status.push((task, status));
    }
    // The job's comment is set when the last local task has ended: by the time
    // of the exit callback srun has already seen the tasks end and the job may
    // be finished, and Slurm refuses to update a finished job.
    let (step, statuses) = {
        let st = state();
        (st.step.clone(), st.task_status.clone())
    };
    if let (Some(step), Some(ntasks)) = (step, get_u32(sp, ffi::S_JOB_LOCAL_TASK_COUNT)) {
        if statuses.len() == ntasks as usize {
            if let Ok(cfg) = site(ac, av) {
                if cfg.comment {
                    set_comment(&cfg, &step, &statuses);
                }
            }
        }
    }
    0
}

/// `scontrol update JobId=.. Comment=..` with the job's totals including this step.
fn set_comment(cfg: &SiteConfig, step: &ActiveStep, statuses: &[(u32, i32)]) {
    let mut job = fs::read(cfg.accounting_dir.join(format!("{}.json", step.job_id)))
        .ok()
        .and_then(|b| serde_json::from_slice::<accounting::JobAccounting>(&b).ok())
        .unwrap_or_else(|| accounting::JobAccounting::new(step.job_id, step.uid));
    job.add_step(step_record(step, statuses));
    let args = ["update".to_string(), format!("JobId={}", step.job_id), format!("Comment={}", job.comment())];
    if let Err(e) = run(&cfg.scontrol, &args, Duration::from_secs(15)) {
        ffi::log_error(&format!("lwk: setting the comment of job {}: {e}", step.job_id));
    }
}

/// The step's record from the task statuses and the statistics files.
fn step_record(step: &ActiveStep, statuses: &[(u32, i32)]) -> StepRecord {
    let mut tasks: Vec<TaskRecord> = statuses
        .iter()
        .map(|&(t, st)| TaskRecord::new(t, Some(st), accounting::read_stats(&stats_file(&step.stats_dir, t))))
        .collect();
    // Statistics of tasks whose status slurmstepd did not report (epilog recovery).
    if let Ok(entries) = fs::read_dir(&step.stats_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(t) = name.strip_prefix("task-").and_then(|n| n.strip_suffix(".json")) else { continue };
            let Ok(t) = t.parse::<u32>() else { continue };
            if !tasks.iter().any(|r| r.task == t) {
                tasks.push(TaskRecord::new(t, None, accounting::read_stats(&e.path())));
            }
        }
    }
    StepRecord::new(&step.step, &node_name(), &step.partition, &step.cpus, step.mem, tasks)
}

/// slurmstepd (and srun, sbatch, salloc, which have nothing to do): the step ended.
#[no_mangle]
pub extern "C" fn slurm_spank_exit(_sp: SpankT, ac: c_int, av: *mut *mut c_char) -> c_int {
    // SAFETY: as in slurm_spank_init: no arguments, called from a Slurm callback.
    if unsafe { ffi::spank_context() } != ffi::S_CTX_REMOTE {
        return 0;
    }
    let (step, statuses) = {
        let mut st = state();
        (st.step.take(), std::mem::take(&mut st.task_status))
    };
    let Some(step) = step else { return 0 };
    let Ok(cfg) = site(ac, av) else { return 0 };
    finish_step(&cfg, &step, &statuses, false);
    0
}

fn node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut c_char, buf.len()) } != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let full = String::from_utf8_lossy(&buf[..end]).into_owned();
    full.split('.').next().unwrap_or(&full).to_string()
}

/// Destroy the partition (if this step owns it), account, clean up. Every
/// failure is logged and the rest still done.
fn finish_step(cfg: &SiteConfig, step: &ActiveStep, statuses: &[(u32, i32)], recovered: bool) {
    if step.owned {
        let args = ["partition", "destroy", "--force", &step.partition].map(String::from);
        match run(&cfg.lwk, &args, LWK_LIMIT) {
            Ok(_) => ffi::log_info(&format!("lwk: destroyed partition {}", step.partition)),
            Err(e) => ffi::log_error(&format!("lwk: destroying partition {}: {e}", step.partition)),
        }
    }
    let mut record = step_record(step, statuses);
    record.recovered_by_epilog = recovered;
    match accounting::record_step(&cfg.accounting_dir, step.job_id, step.uid, record) {
        Ok(_) => {}
        Err(e) => ffi::log_error(&format!("lwk: accounting of job {}: {e}", step.job_id)),
    }
    remove_stats_dir(cfg, &step.stats_dir);
}

/// slurmd's epilog, root: whatever steps of this job left (a slurmstepd that
/// was killed before its exit callback) is destroyed and accounted here.
#[no_mangle]
pub extern "C" fn slurm_spank_job_epilog(sp: SpankT, ac: c_int, av: *mut *mut c_char) -> c_int {
    let cfg = match site(ac, av) {
        Ok(c) => c,
        Err(e) => {
            ffi::log_error(&e.to_string());
            return 0;
        }
    };
    let (Some(job_id), Some(uid)) = (get_u32(sp, ffi::S_JOB_ID), get_u32(sp, ffi::S_JOB_UID)) else { return 0 };
    let prefix = format!("slurm-{job_id}.");
    let mut leftover: Vec<ActiveStep> = Vec::new();
    if let Ok(entries) = fs::read_dir(&cfg.partitions_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix(&prefix) {
                leftover.push(ActiveStep {
                    job_id,
                    uid,
                    step: step.to_string(),
                    partition: name.clone(),
                    owned: true,
                    cpus: String::new(),
                    mem: 0,
                    stats_dir: cfg.state_dir.join(format!("{job_id}.{step}")),
                });
            }
        }
    }
    if let Ok(entries) = fs::read_dir(&cfg.state_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix(&format!("{job_id}.")) {
                if !leftover.iter().any(|s| s.step == step) {
                    leftover.push(ActiveStep {
                        job_id,
                        uid,
                        step: step.to_string(),
                        partition: format!("{prefix}{step}"),
                        owned: false,
                        cpus: String::new(),
                        mem: 0,
                        stats_dir: e.path(),
                    });
                }
            }
        }
    }
    for step in &leftover {
        ffi::log_error(&format!("lwk: job {job_id} step {} left {}, cleaning up", step.step, step.partition));
        finish_step(&cfg, step, &[], true);
    }
    0
}
