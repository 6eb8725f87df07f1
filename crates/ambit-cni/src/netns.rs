//! Finding a pod's network namespace from its IP addresses.
//!
//! In a cluster the container runtime names a pod's network namespace (containerd and
//! CRI-O: `/var/run/netns/cni-<uuid>`), and the CNI plugin reports that path when the pod
//! is created. A pod created before the agent ran, or while it was away, is found by its
//! addresses instead: every network namespace on the node (the files in the runtime's
//! namespace directories, and `/proc/<pid>/ns/net` of every process) is entered on a
//! short-lived thread and its interface addresses listed. A pod IP held by more than one
//! namespace is refused as ambiguous rather than guessed: enrolling the wrong namespace
//! would hand another pod's traffic to the proxy under this pod's identity.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::sched::CloneFlags;

/// Why no single namespace could be named for a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no network namespace on this node holds {0}")]
    NotFound(String),
    #[error(
        "{ip} is held by more than one network namespace ({}); refusing to guess which is the pod's",
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Ambiguous { ip: IpAddr, paths: Vec<PathBuf> },
    #[error("the pod has no IP address yet")]
    NoAddress,
}

/// Where to look for network namespaces.
#[derive(Debug, Clone)]
pub struct Search {
    /// Directories of namespace files (bind mounts), e.g. `/var/run/netns`.
    pub dirs: Vec<PathBuf>,
    /// The proc filesystem whose processes' namespaces are looked at, or none.
    pub proc: Option<PathBuf>,
}

impl Default for Search {
    fn default() -> Self {
        Self {
            dirs: vec![PathBuf::from("/var/run/netns"), PathBuf::from("/run/netns")],
            proc: Some(PathBuf::from("/proc")),
        }
    }
}

/// One scan of the node: which namespace holds which address.
#[derive(Debug, Default)]
pub struct AddressIndex {
    by_ip: HashMap<IpAddr, Vec<PathBuf>>,
}

impl AddressIndex {
    /// Enters every namespace `search` names (once each, however many paths lead to it;
    /// the agent's own namespace and the host's are skipped) and lists its addresses.
    /// Namespaces that vanish or cannot be entered mid-scan are skipped.
    pub fn scan(search: &Search) -> Self {
        let mut skip: HashSet<(u64, u64)> = HashSet::new();
        for own in ["/proc/self/ns/net", "/proc/1/ns/net"] {
            if let Ok(m) = std::fs::metadata(own) {
                skip.insert((m.dev(), m.ino()));
            }
        }
        let mut seen = skip.clone();
        let mut index = AddressIndex::default();
        for path in candidates(search) {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let Ok(addresses) = addresses_in(&file) else {
                continue;
            };
            for ip in addresses {
                index.by_ip.entry(ip).or_default().push(path.clone());
            }
        }
        index
    }

    /// The one namespace holding every one of `ips`.
    pub fn lookup(&self, ips: &[IpAddr]) -> Result<PathBuf, LookupError> {
        let Some(first) = ips.first() else {
            return Err(LookupError::NoAddress);
        };
        let mut found: Option<&PathBuf> = None;
        for ip in ips {
            match self.by_ip.get(ip).map(Vec::as_slice) {
                None | Some([]) => return Err(LookupError::NotFound(ip.to_string())),
                Some([one]) => match found {
                    Some(p) if p != one => {
                        return Err(LookupError::Ambiguous {
                            ip: *ip,
                            paths: vec![p.clone(), one.clone()],
                        });
                    }
                    _ => found = Some(one),
                },
                Some(many) => {
                    return Err(LookupError::Ambiguous {
                        ip: *ip,
                        paths: many.to_vec(),
                    });
                }
            }
        }
        found
            .cloned()
            .ok_or_else(|| LookupError::NotFound(first.to_string()))
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// Namespace files first (their paths outlive any one process), then processes'.
fn candidates(search: &Search) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in &search.dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        out.extend(files);
    }
    if let Some(proc) = &search.proc
        && let Ok(entries) = std::fs::read_dir(proc)
    {
        let mut pids: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        out.extend(
            pids.into_iter()
                .map(|pid| proc.join(pid.to_string()).join("ns/net")),
        );
    }
    out
}

/// The interface addresses inside a namespace, read on a thread that entered it (the
/// thread ends with the read, so nothing else ever runs there).
pub fn addresses_in(netns: &File) -> Result<Vec<IpAddr>, nix::Error> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)?;
                let mut out = Vec::new();
                for ifa in nix::ifaddrs::getifaddrs()? {
                    let Some(addr) = ifa.address else { continue };
                    let ip = if let Some(v4) = addr.as_sockaddr_in() {
                        IpAddr::V4(v4.ip())
                    } else if let Some(v6) = addr.as_sockaddr_in6() {
                        IpAddr::V6(v6.ip())
                    } else {
                        continue;
                    };
                    if !ip.is_loopback() {
                        out.push(ip);
                    }
                }
                Ok(out)
            })
            .join()
            .unwrap_or(Err(nix::Error::EIO))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &[&str])]) -> AddressIndex {
        let mut i = AddressIndex::default();
        for (path, ips) in entries {
            for ip in *ips {
                i.by_ip
                    .entry(ip.parse().unwrap())
                    .or_default()
                    .push(PathBuf::from(path));
            }
        }
        i
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn one_namespace_holding_every_address_is_the_pods() {
        let i = index(&[
            ("/run/netns/cni-a", &["198.18.0.2", "fd00::2"]),
            ("/run/netns/cni-b", &["198.18.0.3"]),
        ]);
        assert_eq!(
            i.lookup(&ips(&["198.18.0.2", "fd00::2"])).unwrap(),
            PathBuf::from("/run/netns/cni-a")
        );
        assert_eq!(
            i.lookup(&ips(&["198.18.0.3"])).unwrap(),
            PathBuf::from("/run/netns/cni-b")
        );
    }

    #[test]
    fn missing_split_or_duplicated_addresses_are_refused() {
        let i = index(&[
            ("/run/netns/cni-a", &["198.18.0.2"]),
            ("/run/netns/cni-b", &["198.18.0.3", "198.18.0.9"]),
            ("/proc/77/ns/net", &["198.18.0.9"]),
        ]);
        assert_eq!(
            i.lookup(&ips(&["198.18.0.4"])),
            Err(LookupError::NotFound("198.18.0.4".into()))
        );
        assert!(matches!(
            i.lookup(&ips(&["198.18.0.2", "198.18.0.3"])),
            Err(LookupError::Ambiguous { .. })
        ));
        let e = i.lookup(&ips(&["198.18.0.9"])).unwrap_err();
        assert!(e.to_string().contains("refusing to guess"), "{e}");
        assert_eq!(i.lookup(&[]), Err(LookupError::NoAddress));
    }
}
