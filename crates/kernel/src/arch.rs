//! The x86-64 registers of an interrupted application context: the
//! kernel's `ucontext_t` as a signal frame carries it (general registers,
//! signal mask, alternate stack) and the FPU/vector state it points to (the
//! XSAVE area). The trap layer reads the system call from it and writes the
//! result back; threads start from one; a saved thread is one.

use core::arch::global_asm;

// The return from every signal handler the LWK installs: rt_sigreturn,
// from inside the LWK's text (the region Syscall User Dispatch allows), or
// the rt_sigreturn would itself trap.
global_asm!(
    ".globl lwk_restorer",
    "lwk_restorer:",
    "mov eax, {nr}",
    "syscall",
    "ud2",
    nr = const lwk_rt::nr::RT_SIGRETURN
);

extern "C" {
    fn lwk_restorer();
}

/// The address of the LWK's signal restorer (`sa_restorer`).
pub fn restorer_addr() -> u64 {
    lwk_restorer as *const () as u64
}

/// arch_prctl(2) codes: the FS base is the application's TLS, the GS base
/// the LWK's way to its thread slots.
pub const ARCH_SET_GS: u64 = 0x1001;
pub const ARCH_SET_FS: u64 = 0x1002;
pub const ARCH_GET_FS: u64 = 0x1003;
pub const ARCH_GET_GS: u64 = 0x1004;

/// Indexes of `UContext::gregs` (the kernel's `struct sigcontext` order).
pub const REG_R8: usize = 0;
pub const REG_R9: usize = 1;
pub const REG_R10: usize = 2;
pub const REG_RDI: usize = 8;
pub const REG_RSI: usize = 9;
pub const REG_RDX: usize = 12;
pub const REG_RAX: usize = 13;
pub const REG_RSP: usize = 15;
pub const REG_RIP: usize = 16;
/// The general registers, flags, segment selectors and fault information.
pub const NGREG: usize = 23;

/// The kernel's `struct ucontext` on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UContext {
    pub flags: u64,
    pub link: u64,
    pub ss_sp: u64,
    pub ss_flags: u32,
    pub _pad: u32,
    pub ss_size: u64,
    pub gregs: [u64; NGREG],
    /// The FPU/vector state (see [`UContext::fpstate`]), in the same signal frame; 0 for
    /// a fresh state on rt_sigreturn.
    pub fpregs: u64,
    pub reserved: [u64; 8],
    /// The signal mask restored by rt_sigreturn: the application's mask.
    pub sigmask: u64,
}

const _: () = assert!(core::mem::offset_of!(UContext, sigmask) == 296);

impl UContext {
    pub const ZERO: UContext = UContext {
        flags: 0,
        link: 0,
        ss_sp: 0,
        ss_flags: 0,
        _pad: 0,
        ss_size: 0,
        gregs: [0; NGREG],
        fpregs: 0,
        reserved: [0; 8],
        sigmask: 0,
    };

    /// The system call a trapped `syscall` asked for: number and arguments.
    pub fn syscall(&self) -> (u64, [u64; 6]) {
        let g = &self.gregs;
        (g[REG_RAX], [g[REG_RDI], g[REG_RSI], g[REG_RDX], g[REG_R10], g[REG_R8], g[REG_R9]])
    }

    /// Make the interrupted `syscall` run again when the context resumes:
    /// back onto the 2-byte instruction, with the number in rax again.
    pub fn restart_syscall(&mut self, nr: u64) {
        self.gregs[REG_RIP] -= 2;
        self.gregs[REG_RAX] = nr;
    }

    /// The FPU/vector state this context points to, if any.
    ///
    /// # Safety
    /// `fpregs` must be 0 or point to the state the kernel put in this
    /// context's signal frame (which lives as long as the frame).
    pub unsafe fn fpstate(&self) -> Option<&[u8]> {
        if self.fpregs == 0 {
            return None;
        }
        // SAFETY: the caller vouches for the frame; the size comes from the
        // kernel's own description of it inside the legacy area.
        unsafe {
            let legacy = core::slice::from_raw_parts(self.fpregs as *const u8, FXSAVE_SIZE);
            let n = fpstate_size(legacy);
            Some(core::slice::from_raw_parts(self.fpregs as *const u8, n))
        }
    }
}

/// Size of the legacy FXSAVE area that starts every FPU state.
pub const FXSAVE_SIZE: usize = 512;
/// `struct _fpx_sw_bytes` inside the legacy area's software-reserved bytes.
const SW_BYTES: usize = 464;
/// `FP_XSTATE_MAGIC1`: the frame holds an XSAVE area, not only FXSAVE.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// `FP_XSTATE_MAGIC2`, stored right after the XSAVE area.
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// The largest XSAVE area a snapshot keeps (AVX-512 with AMX tiles is
/// about 11 KiB; this machine's is far less).
pub const FPSTATE_MAX: usize = 12 << 10;

/// How many bytes of FPU state a signal frame's `legacy` area (its first
/// 512 bytes) says it holds: the whole XSAVE area with its trailing magic
/// when the kernel marked it so, else the 512-byte FXSAVE area.
pub fn fpstate_size(legacy: &[u8]) -> usize {
    let rd = |o: usize| u32::from_le_bytes([legacy[o], legacy[o + 1], legacy[o + 2], legacy[o + 3]]);
    if legacy.len() < FXSAVE_SIZE || rd(SW_BYTES) != FP_XSTATE_MAGIC1 {
        return FXSAVE_SIZE;
    }
    // extended_size: the XSAVE area plus FP_XSTATE_MAGIC2.
    let extended = rd(SW_BYTES + 4) as usize;
    if !(FXSAVE_SIZE..=FPSTATE_MAX).contains(&extended) {
        return FXSAVE_SIZE;
    }
    extended
}

/// Is the XSAVE area `state` (from [`UContext::fpstate`]) whole: closed by
/// the kernel's second magic?
pub fn fpstate_intact(state: &[u8]) -> bool {
    let n = state.len();
    n == FXSAVE_SIZE
        || (n >= FXSAVE_SIZE + 4
            && u32::from_le_bytes([state[n - 4], state[n - 3], state[n - 2], state[n - 1]]) == FP_XSTATE_MAGIC2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(magic: u32, extended: u32) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[SW_BYTES..SW_BYTES + 4].copy_from_slice(&magic.to_le_bytes());
        b[SW_BYTES + 4..SW_BYTES + 8].copy_from_slice(&extended.to_le_bytes());
        b
    }

    #[test]
    fn fpstate_size_follows_the_kernels_description() {
        assert_eq!(fpstate_size(&legacy(0, 0)), 512, "FXSAVE only");
        assert_eq!(fpstate_size(&legacy(FP_XSTATE_MAGIC1, 2696)), 2696);
        assert_eq!(fpstate_size(&legacy(FP_XSTATE_MAGIC1, 100)), 512, "nonsense size");
        assert_eq!(fpstate_size(&legacy(FP_XSTATE_MAGIC1, 1 << 20)), 512, "too large");
    }

    #[test]
    fn syscall_and_restart() {
        let mut uc = UContext::ZERO;
        uc.gregs[REG_RAX] = 39;
        uc.gregs[REG_RDI] = 1;
        uc.gregs[REG_R9] = 6;
        uc.gregs[REG_RIP] = 0x1002;
        assert_eq!(uc.syscall(), (39, [1, 0, 0, 0, 0, 6]));
        uc.gregs[REG_RAX] = (-4i64) as u64;
        uc.restart_syscall(39);
        assert_eq!((uc.gregs[REG_RIP], uc.gregs[REG_RAX]), (0x1000, 39));
    }
}
