//! The service address that goes with a migrating application: taken off
//! the source's interface at the commit, put on the destination's, and
//! announced there (a gratuitous ARP), so that the clients' packets come to
//! the node that has the application.
//!
//! Addresses are added and removed with iproute2's `ip` (a route-netlink
//! crate would bring an async runtime for two calls); the announcement is
//! one ARP packet on an AF_PACKET socket.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// An address with its prefix length, as `ip` writes it ("198.18.0.10/24").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Cidr> {
        let (a, p) = s.split_once('/').with_context(|| format!("{s}: an address with its prefix (A.B.C.D/N)"))?;
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s}: not an IPv4 address"))?;
        let prefix: u8 = p.parse().ok().filter(|&p| p <= 32).with_context(|| format!("{s}: a prefix of 0 to 32"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let o = Command::new("ip").args(args).output().context("cannot run ip (install iproute2)")?;
    if !o.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The interface that has `addr`, if one has it.
pub fn device_of(addr: Ipv4Addr) -> Result<Option<String>> {
    // "2: eth0    inet 198.18.0.10/24 ..."
    let out = ip(&["-o", "-4", "addr", "show"])?;
    Ok(out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let i = f.iter().position(|&w| w == "inet")?;
        let a = f.get(i + 1)?.split('/').next()?;
        (a.parse::<Ipv4Addr>().ok()? == addr).then(|| f[1].trim_end_matches(':').to_string())
    }))
}

/// Take `cidr` off whichever interface has it; the interface's name.
pub fn remove(cidr: Cidr) -> Result<String> {
    let dev = device_of(cidr.addr)?.with_context(|| format!("no interface here has {}", cidr.addr))?;
    ip(&["addr", "del", &cidr.to_string(), "dev", &dev])?;
    Ok(dev)
}

/// Put `cidr` on `dev` and announce it.
pub fn add(cidr: Cidr, dev: &str) -> Result<()> {
    ip(&["addr", "add", &cidr.to_string(), "dev", dev])?;
    announce(cidr.addr, dev).with_context(|| format!("announcing {} on {dev}", cidr.addr))
}

/// The hardware address of `dev` in this network namespace (SIOCGIFHWADDR:
/// /sys/class/net shows the devices of the namespace sysfs was mounted in,
/// which need not be ours).
pub fn hardware_address(dev: &str) -> Result<Vec<u8>> {
    if dev.len() >= libc::IFNAMSIZ {
        bail!("{dev}: an interface name is shorter");
    }
    // SAFETY: a fresh socket of ours, for the ioctl only; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("a socket");
    }
    // SAFETY: ifreq is plain data; zero is a valid start.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, &b) in req.ifr_name.iter_mut().zip(dev.as_bytes()) {
        *to = b as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    let r = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let e = std::io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(e).context("SIOCGIFHWADDR");
    }
    // SAFETY: the kernel filled the hardware-address member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(data[..6].iter().map(|&b| b as u8).collect())
}

/// A gratuitous ARP for `addr` on `dev`: neighbours learn at once that the
/// address is here now.
pub fn announce(addr: Ipv4Addr, dev: &str) -> Result<()> {
    let mac = hardware_address(dev).with_context(|| format!("the hardware address of {dev}"))?;
    let index = std::ffi::CString::new(dev).context("a NUL in the device name")?;
    // SAFETY: plain if_nametoindex on a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(index.as_ptr()) };
    if ifindex == 0 || mac.len() != 6 {
        bail!("no interface {dev} with an Ethernet address");
    }
    // ARP over Ethernet: hardware type 1, IPv4, lengths 6 and 4, a request
    // (op 1) whose sender and target address are both `addr`.
    let mut pkt = vec![0u8, 1, 0x08, 0x00, 6, 4, 0, 1];
    pkt.extend_from_slice(&mac);
    pkt.extend_from_slice(&addr.octets());
    pkt.extend_from_slice(&[0; 6]);
    pkt.extend_from_slice(&addr.octets());
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: a fresh packet socket of ours, closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, ETH_P_ARP.to_be() as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("an AF_PACKET socket");
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: pkt and to are ours and sized as given.
    let r = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err).context("sending the announcement");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_prefixes_parse_and_bad_ones_are_named() {
        let c: Cidr = "198.18.0.10/24".parse().unwrap();
        assert_eq!((c.addr, c.prefix), (Ipv4Addr::new(198, 18, 0, 10), 24));
        assert_eq!(c.to_string(), "198.18.0.10/24");
        for bad in ["198.18.0.10", "198.18.0/24", "198.18.0.10/33", "x/1"] {
            let e = bad.parse::<Cidr>().unwrap_err().to_string();
            assert!(e.starts_with(bad), "{e}");
        }
    }

    #[test]
    fn the_hardware_address_is_the_one_sysfs_shows_for_each_interface_here() {
        let mut seen = 0;
        for e in std::fs::read_dir("/sys/class/net").unwrap().flatten() {
            let dev = e.file_name().into_string().unwrap();
            let text = std::fs::read_to_string(e.path().join("address")).unwrap();
            let want: Vec<u8> = text.trim().split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
            if want.len() != 6 {
                continue;
            }
            assert_eq!(hardware_address(&dev).unwrap(), want, "{dev}");
            seen += 1;
        }
        assert!(seen > 0, "no interface with a 6-byte hardware address here");
    }
}
