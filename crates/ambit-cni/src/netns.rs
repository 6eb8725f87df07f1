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
        // Only processes of the agent's own user namespace (the host's): anyone may make
        // a network namespace inside a user namespace of their own, and put a pod's
        // address in it to be taken for that pod. Pod sandboxes belong to the host's.
        let own_user = std::fs::metadata("/proc/self/ns/user")
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let mut pids: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        out.extend(
            pids.into_iter()
                .map(|pid| proc.join(pid.to_string()))
                .filter(|dir| {
                    let user = std::fs::metadata(dir.join("ns/user"))
                        .ok()
                        .map(|m| (m.dev(), m.ino()));
                    user.is_some() && user == own_user
                })
                .map(|dir| dir.join("ns/net")),
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

    /// Runs `script` in new namespaces made by `unshare` with `flags`; it writes "ready"
    /// when set up, then sleeps until killed.
    fn spawn_in(flags: &[&str], script: &str) -> std::process::Child {
        let mut child = std::process::Command::new("unshare")
            .args(flags)
            .args(["sh", "-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("this test needs root and util-linux's unshare (CI runs it as root)");
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut out, &mut buf).expect("the namespace was not set up");
        child
    }

    #[test]
    fn a_network_namespace_of_a_foreign_user_namespace_is_never_taken_for_a_pod() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (network and user namespaces); CI runs it as root"
        );
        let ip = |last: u8| -> IpAddr { format!("198.18.251.{last}").parse().unwrap() };
        let script = |last: u8| {
            format!(
                "ip link set lo up && ip addr add 198.18.251.{last}/32 dev lo && echo ready && exec sleep 60"
            )
        };
        // A process in a network namespace of the host's user namespace: found.
        let mut host_owned = spawn_in(&["--net"], &script(7));
        // One whose network namespace belongs to a user namespace of its own: not found.
        let mut foreign = spawn_in(&["--user", "--map-root-user", "--net"], &script(8));
        let search = Search {
            dirs: vec![],
            proc: Some(PathBuf::from("/proc")),
        };
        let index = AddressIndex::scan(&search);
        let found = index.lookup(&[ip(7)]);
        let hidden = index.lookup(&[ip(8)]);
        let _ = host_owned.kill();
        let _ = foreign.kill();
        let _ = host_owned.wait();
        let _ = foreign.wait();
        assert!(found.is_ok(), "{found:?}");
        assert_eq!(hidden, Err(LookupError::NotFound("198.18.251.8".into())));
    }
}
