//! The LWK image. `lwk run` starts it twice: once as the application
//! process (`app`), where it becomes the lightweight kernel under the
//! program, and once as the proxy (`proxy`), the Linux-side delegate.
//! `lwk restore` starts the application process as `restore`, to put a
//! frozen application back.
#![no_std]
#![no_main]

use core::arch::global_asm;

use lwk_kernel::boot::{self, Startup};
use lwk_rt::exit_group;

// Linux enters with the stack pointer at argc; keep it and align.
global_asm!(".globl _start", "_start:", "xor ebp, ebp", "mov rdi, rsp", "and rsp, -16", "call lwk_entry", "ud2");

/// # Safety
/// Called once by `_start` with the kernel's initial stack pointer.
#[no_mangle]
pub unsafe extern "C" fn lwk_entry(sp: *const u64) -> ! {
    // SAFETY: sp is the initial stack pointer.
    let st = unsafe { Startup::parse(sp) };
    match (st.argc > 2).then(|| st.arg(1)) {
        Some(b"app") | Some(b"exec") => boot::app_main(&st),
        Some(b"restore") => lwk_kernel::restore::restore_main(&st),
        Some(b"proxy") => {
            let fd = boot::parse_int(st.arg(2)).unwrap_or(-1) as i32;
            // The first proxy, like the first application process, dies
            // with `lwk run`: an application killed before it started would
            // otherwise leave its proxy waiting for it forever. (Proxies of
            // forked children are forks of this one and do not inherit it;
            // `lwk restore` names those it starts for forked processes
            // `child`: they may outlive it, and its pid namespace's keeper
            // ends them if it dies before their application runs.)
            let child = st.argc > 4 && st.arg(4) == b"child";
            let mapped = boot::map_control(fd).and_then(|()| if child { Ok(()) } else { boot::die_with_supervisor() });
            // The proxy's descriptor table is the application's: nothing of
            // the LWK's may stay in it.
            lwk_rt::close(fd);
            // `lwk restore` names the application's descriptors that close on
            // exec (they had to stay open across this image's exec).
            if st.argc > 3 {
                for n in st.arg(3).split(|&c| c == b',').filter_map(boot::parse_int) {
                    const F_SETFD: u64 = 2;
                    const FD_CLOEXEC: u64 = 1;
                    // SAFETY: setting a flag on a descriptor of our own table.
                    unsafe { lwk_rt::syscall3(lwk_rt::nr::FCNTL, n as u64, F_SETFD, FD_CLOEXEC) };
                }
            }
            if let Err(e) = mapped {
                lwk_rt::diag!("proxy: {}", e);
                exit_group(125);
            }
            lwk_proxy::run()
        }
        _ => {
            lwk_rt::diag!("lwk-kernel is the LWK image; start programs with `lwk run -- PROGRAM`");
            exit_group(2)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    lwk_rt::diag!("internal error in the LWK: {}", info);
    exit_group(125)
}

/// Never called: the image is built with panic=abort, but the prebuilt
/// `core` still names the unwinding personality routine.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
