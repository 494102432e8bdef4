//! Formatted output without an allocator: `eprintln!`-like macros that
//! format into a stack buffer and write it with one system call.

use core::fmt;

/// The descriptor the LWK writes its own messages to. In the application
/// process this is a private duplicate of the original stderr, because the
/// application's fd 2 lives in the proxy.
pub static DIAG_FD: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(2);

pub struct StackBuf<const N: usize> {
    pub buf: [u8; N],
    pub len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub const fn new() -> Self {
        StackBuf { buf: [0; N], len: 0 }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

pub fn print_diag(args: fmt::Arguments) {
    let mut b = StackBuf::<512>::new();
    let _ = fmt::write(&mut b, args);
    crate::sys::write_all(DIAG_FD.load(core::sync::atomic::Ordering::Relaxed), b.as_bytes());
}

/// Print a line on the LWK's diagnostic descriptor, prefixed with "lwk: ".
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {
        $crate::out::print_diag(format_args!("lwk: {}\n", format_args!($($arg)*)))
    };
}

/// Decimal digits of `v`, written at the end of `buf`.
pub fn fmt_u64(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// "/proc/PID/fd/FD" with a NUL into `buf`; returns the length with the NUL.
pub fn proc_fd_path(buf: &mut [u8; 64], pid: i32, fd: i32) -> usize {
    let mut n = 0;
    for part in
        [b"/proc/".as_slice(), fmt_u64(&mut [0; 20], pid as u64), b"/fd/", fmt_u64(&mut [0; 20], fd as u64), b"\0"]
    {
        buf[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    n
}

/// A decimal number, all digits.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(
        0u64,
        |v, &c| if c.is_ascii_digit() { v.checked_mul(10)?.checked_add((c - b'0') as u64) } else { None },
    )
}
