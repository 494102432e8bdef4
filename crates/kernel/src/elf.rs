//! Loading an x86-64 ELF program (and its interpreter) into LWK memory.
//!
//! Parsed by hand: the loader needs six fields of the header and of each
//! program header, read with pread into stack buffers; the `elf` crate
//! would need the file in one slice, which means an allocation here.

use lwk_abi::layout::{APP_END, APP_START, PIE_BASE};
use lwk_rt::*;

use crate::mm::{page_up, Mm};

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_PHDR: u32 = 6;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const MAX_PHDRS: usize = 128;
const PHDR_SIZE: usize = 56;

/// Why a file cannot be run, with the exit status a shell would give.
#[derive(Clone, Copy, Debug)]
pub struct LoadError {
    pub status: i32,
    pub reason: &'static str,
    pub errno: i64,
}

impl LoadError {
    const fn exec(reason: &'static str) -> Self {
        LoadError { status: 126, reason, errno: -ENOEXEC }
    }
    pub fn io(errno: i64) -> Self {
        let status = if errno == -ENOENT { 127 } else { 126 };
        LoadError { status, reason: "", errno }
    }
}

#[derive(Clone, Copy)]
pub struct Image {
    pub entry: u64,
    pub phdr: u64,
    pub phnum: u64,
    pub phent: u64,
    pub bias: u64,
    /// First address after the highest segment.
    pub end: u64,
    pub interp: [u8; 256],
    /// Length of the interpreter path without NUL; 0 when static.
    pub interp_len: usize,
}

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

fn pread_exact(fd: i32, buf: &mut [u8], off: u64) -> Result<(), LoadError> {
    let mut done = 0;
    while done < buf.len() {
        let r = pread(fd, &mut buf[done..], off + done as u64);
        if r == -EINTR {
            continue;
        }
        if r < 0 {
            return Err(LoadError::io(r));
        }
        if r == 0 {
            return Err(LoadError::exec("truncated ELF file"));
        }
        done += r as usize;
    }
    Ok(())
}

/// Check the ELF header; returns (type, entry, phoff, phnum). The one
/// check: the LWK's loader and `lwk run`'s early refusal both use it.
pub fn check_header(h: &[u8; 64]) -> Result<(u16, u64, u64, usize), LoadError> {
    if &h[..4] != b"\x7fELF" {
        return Err(LoadError::exec("not an ELF executable"));
    }
    match h[4] {
        ELFCLASS64 => {}
        ELFCLASS32 => return Err(LoadError::exec("32-bit ELF is not supported (x86-64 only)")),
        _ => return Err(LoadError::exec("bad ELF header (class)")),
    }
    if h[5] != ELFDATA2LSB {
        return Err(LoadError::exec("not an x86-64 ELF (big-endian)"));
    }
    if rd16(h, 18) != EM_X86_64 {
        return Err(LoadError::exec(other_machine(rd16(h, 18))));
    }
    let ty = rd16(h, 16);
    if ty != ET_EXEC && ty != ET_DYN {
        return Err(LoadError::exec(match ty {
            ET_REL => "not an executable ELF (type REL, an object file)",
            ET_CORE => "not an executable ELF (type CORE, a core dump)",
            _ => "not an executable ELF",
        }));
    }
    let phnum = rd16(h, 56) as usize;
    if rd16(h, 54) as usize != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err(LoadError::exec("bad ELF program headers"));
    }
    Ok((ty, rd64(h, 24), rd64(h, 32), phnum))
}

const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_REL: u16 = 1;
const ET_CORE: u16 = 4;

/// The refusal for an ELF of another machine, naming the common ones.
fn other_machine(m: u16) -> &'static str {
    match m {
        3 => "not an x86-64 ELF (machine i386)",
        40 => "not an x86-64 ELF (machine ARM)",
        183 => "not an x86-64 ELF (machine AArch64)",
        243 => "not an x86-64 ELF (machine RISC-V)",
        21 => "not an x86-64 ELF (machine PowerPC64)",
        22 => "not an x86-64 ELF (machine S/390)",
        _ => "not an x86-64 ELF",
    }
}

/// Load the ELF open on `fd`. The main program of a PIE goes to PIE_BASE,
/// an interpreter wherever the memory manager finds room.
pub fn load(mm: &mut Mm, fd: i32, interp: bool) -> Result<Image, LoadError> {
    let mut h = [0u8; 64];
    pread_exact(fd, &mut h, 0)?;
    let (ty, entry, phoff, phnum) = check_header(&h)?;
    let mut ph = [0u8; PHDR_SIZE * MAX_PHDRS];
    let ph = &mut ph[..PHDR_SIZE * phnum];
    pread_exact(fd, ph, phoff)?;
    let phdr = |i: usize| &ph[i * PHDR_SIZE..(i + 1) * PHDR_SIZE];

    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for i in 0..phnum {
        let p = phdr(i);
        if rd32(p, 0) == PT_LOAD {
            let (vaddr, memsz) = (rd64(p, 16), rd64(p, 40));
            lo = lo.min(vaddr & !4095);
            hi = hi.max(vaddr.checked_add(memsz).ok_or(LoadError::exec("bad ELF segment"))?);
        }
    }
    if lo >= hi {
        return Err(LoadError::exec("ELF file has nothing to load"));
    }
    let hi = page_up(hi);
    let bias = if ty == ET_EXEC {
        0
    } else if !interp {
        PIE_BASE - lo
    } else {
        mm.find_free(hi - lo).ok_or(LoadError { status: 126, reason: "no room for the interpreter", errno: -ENOMEM })?
            - lo
    };
    if lo.wrapping_add(bias) < APP_START || hi.wrapping_add(bias) > APP_END {
        return Err(LoadError::exec("ELF segments lie outside the application's address range"));
    }

    let mut img = Image {
        entry: entry.wrapping_add(bias),
        phdr: 0,
        phnum: phnum as u64,
        phent: PHDR_SIZE as u64,
        bias,
        end: 0,
        interp: [0; 256],
        interp_len: 0,
    };
    for i in 0..phnum {
        let p = phdr(i);
        let (ptype, flags, off, vaddr, filesz, memsz) =
            (rd32(p, 0), rd32(p, 4), rd64(p, 8), rd64(p, 16), rd64(p, 32), rd64(p, 40));
        match ptype {
            PT_LOAD => {
                if filesz > memsz || off % 4096 != vaddr % 4096 {
                    return Err(LoadError::exec("bad ELF segment"));
                }
                let start = (vaddr & !4095) + bias;
                let end = page_up(vaddr + memsz) + bias;
                let lead = vaddr & 4095;
                // Linux maps PF_R/W/X as PROT_READ/WRITE/EXEC (bits reversed).
                let prot = ((flags & 4) >> 2) | (flags & 2) | ((flags & 1) << 2);
                let lwk_fd = lwk_abi::control::SRC_LWK_FD_PRIVATE;
                if flags & 2 == 0 && filesz == memsz {
                    // Read-only: the file itself, shared with the page cache.
                    mm.map_file(start, end, prot, fd, off - lead, lwk_fd, fd).map_err(|e| LoadError {
                        status: 126,
                        reason: "cannot map ELF segment",
                        errno: e,
                    })?;
                } else {
                    mm.map_copy(start, end, prot, || {
                        // SAFETY: [start, end) was just mapped read-write for us.
                        let dst =
                            unsafe { core::slice::from_raw_parts_mut(start as *mut u8, (lead + filesz) as usize) };
                        pread_exact(fd, dst, off - lead).map_err(|e| e.errno)
                    })
                    .map_err(|e| LoadError {
                        status: 126,
                        reason: "cannot map ELF segment",
                        errno: e,
                    })?;
                }
                img.end = img.end.max(end);
                if phoff >= off && phoff < off + filesz {
                    img.phdr = vaddr + (phoff - off) + bias;
                }
            }
            PT_INTERP => {
                if filesz == 0 || filesz as usize > img.interp.len() {
                    return Err(LoadError::exec("bad ELF interpreter path"));
                }
                pread_exact(fd, &mut img.interp[..filesz as usize], off)?;
                img.interp_len = img.interp[..filesz as usize].iter().position(|&c| c == 0).unwrap_or(filesz as usize);
                img.interp[img.interp_len] = 0;
            }
            _ => {}
        }
    }
    for i in 0..phnum {
        let p = phdr(i);
        if rd32(p, 0) == PT_PHDR {
            img.phdr = rd64(p, 16) + bias;
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, machine: u16, ty: u16) -> [u8; 64] {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[16..18].copy_from_slice(&ty.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[54..56].copy_from_slice(&56u16.to_le_bytes());
        h[56..58].copy_from_slice(&3u16.to_le_bytes());
        h
    }

    #[test]
    fn header_checks_name_the_reason() {
        assert!(check_header(&header(2, EM_X86_64, ET_DYN)).is_ok());
        assert!(check_header(&header(1, EM_X86_64, ET_EXEC)).unwrap_err().reason.contains("32-bit"));
        assert_eq!(check_header(&header(2, 183, ET_EXEC)).unwrap_err().reason, "not an x86-64 ELF (machine AArch64)");
        assert_eq!(check_header(&header(2, 9999, ET_EXEC)).unwrap_err().reason, "not an x86-64 ELF");
        let rel = check_header(&header(2, EM_X86_64, ET_REL)).unwrap_err().reason;
        assert_eq!(rel, "not an executable ELF (type REL, an object file)");
        assert_eq!(check_header(&header(0, EM_X86_64, ET_EXEC)).unwrap_err().reason, "bad ELF header (class)");
        let mut be = header(2, EM_X86_64, ET_EXEC);
        be[5] = 2;
        assert!(check_header(&be).unwrap_err().reason.contains("big-endian"));
        let mut h = header(2, EM_X86_64, ET_EXEC);
        h[0] = b'#';
        let e = check_header(&h).unwrap_err();
        assert_eq!((e.status, e.reason), (126, "not an ELF executable"));
    }
}
