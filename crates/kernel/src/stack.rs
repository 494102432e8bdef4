//! The application's initial stack, laid out as Linux lays it out:
//! argc, argv, envp, auxv, then the strings and random bytes above them.

use lwk_abi::layout::STACK_TOP;

pub const AT_NULL: u64 = 0;
pub const AT_PHDR: u64 = 3;
pub const AT_PHENT: u64 = 4;
pub const AT_PHNUM: u64 = 5;
pub const AT_PAGESZ: u64 = 6;
pub const AT_BASE: u64 = 7;
pub const AT_FLAGS: u64 = 8;
pub const AT_ENTRY: u64 = 9;
pub const AT_PLATFORM: u64 = 15;
pub const AT_SECURE: u64 = 23;
pub const AT_RANDOM: u64 = 25;
pub const AT_EXECFN: u64 = 31;
pub const AT_SYSINFO_EHDR: u64 = 33;

/// Writes downward from the top of an already mapped stack.
pub struct StackWriter {
    pub sp: u64,
}

impl StackWriter {
    pub fn new() -> Self {
        StackWriter { sp: STACK_TOP }
    }

    /// Copy bytes below the current position; returns their address.
    pub fn push_bytes(&mut self, b: &[u8]) -> u64 {
        self.sp -= b.len() as u64;
        // SAFETY: the stack below STACK_TOP is mapped read-write and large
        // enough for the strings the kernel accepted for our own exec.
        unsafe { core::ptr::copy_nonoverlapping(b.as_ptr(), self.sp as *mut u8, b.len()) };
        self.sp
    }

    /// Copy a C string (with its NUL).
    pub fn push_cstr(&mut self, s: &[u8]) -> u64 {
        self.push_bytes(b"\0");
        self.push_bytes(s)
    }

    pub fn push_word(&mut self, w: u64) {
        self.sp -= 8;
        // SAFETY: as in push_bytes; sp stays 8-aligned once aligned.
        unsafe { (self.sp as *mut u64).write(w) };
    }
}

impl Default for StackWriter {
    fn default() -> Self {
        Self::new()
    }
}
