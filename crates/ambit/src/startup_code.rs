//! Unmapping the code only start-up ran.
//!
//! Most of an idle node proxy's resident set is its executable's code, not its memory:
//! the one `ambit` binary holds every role, and start-up (flag parsing, configuration,
//! the first discovery exchange, certificate set-up) runs code scattered across it, which
//! the kernel maps in runs of up to 64 KiB around each page touched. Once the proxy is
//! ready it asks the kernel to unmap the executable's clean pages. What runs afterwards
//! is mapped back on first use from the page cache (a minor fault: no disk read, and the
//! pages stay cached for every process sharing them), so the resident set settles at the
//! code the proxy actually runs.
//!
//! Only mappings of the executable that are read-only, private and hold no private copy
//! of a page are unmapped: their contents are exactly the file's, so unmapping loses
//! nothing. That excludes the relocated read-only data (its pages are private copies) and
//! any page a debugger patched before this ran. It runs once, right after start-up.

use std::io;

/// What [`unmap_startup_code`] unmapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmapped {
    /// Mappings of the executable advised.
    pub mappings: usize,
    /// Their resident bytes just before.
    pub resident_bytes: u64,
}

/// A mapping of `/proc/self/smaps` that may be unmapped.
#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    start: usize,
    end: usize,
    resident_bytes: u64,
}

/// Unmaps the clean pages of this process's executable (see the module's text).
pub fn unmap_startup_code() -> io::Result<Unmapped> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let exe = exe.to_string_lossy();
    let mut done = Unmapped {
        mappings: 0,
        resident_bytes: 0,
    };
    for c in candidates(&smaps, &exe) {
        advise_dont_need(c.start, c.end - c.start)?;
        done.mappings += 1;
        done.resident_bytes += c.resident_bytes;
    }
    Ok(done)
}

#[allow(unsafe_code)]
fn advise_dont_need(start: usize, len: usize) -> io::Result<()> {
    let Some(addr) = std::ptr::NonNull::new(start as *mut std::ffi::c_void) else {
        return Ok(());
    };
    // SAFETY: the range is a whole mapping of this process's executable that
    // `candidates` found read-only, private and without private pages, so every page in
    // it is the file's own; MADV_DONTNEED only drops them from this process's page
    // tables and the next access maps the same bytes back from the page cache. No Rust
    // reference into the range is invalidated: its contents never change.
    unsafe { nix::sys::mman::madvise(addr, len, nix::sys::mman::MmapAdvise::MADV_DONTNEED) }
        .map_err(io::Error::from)
}

/// The mappings of `exe` in `smaps` (the text of `/proc/self/smaps`) safe to unmap:
/// read-only, private, with no anonymous (copied-on-write) page.
fn candidates(smaps: &str, exe: &str) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut current: Option<(Candidate, bool)> = None;
    let mut finish = |c: Option<(Candidate, bool)>| {
        if let Some((c, true)) = c {
            out.push(c);
        }
    };
    for line in smaps.lines() {
        if let Some(header) = mapping_header(line) {
            finish(current.take());
            let (range, perms, path) = header;
            let eligible = path == exe && perms.len() == 4 && {
                let p = perms.as_bytes();
                p[0] == b'r' && p[1] == b'-' && p[3] == b'p'
            };
            current = range.map(|(start, end)| {
                (
                    Candidate {
                        start,
                        end,
                        resident_bytes: 0,
                    },
                    eligible,
                )
            });
            continue;
        }
        let Some((c, eligible)) = current.as_mut() else {
            continue;
        };
        if let Some(kb) = field_kb(line, "Rss:") {
            c.resident_bytes = kb * 1024;
        } else if let Some(kb) = field_kb(line, "Anonymous:") {
            // A private copy of a page (relocations, a debugger's breakpoint) would be
            // lost: keep the whole mapping.
            *eligible &= kb == 0;
        } else if field_kb(line, "Private_Dirty:").is_some_and(|kb| kb != 0) {
            *eligible = false;
        }
    }
    finish(current.take());
    out
}

type Header<'a> = (Option<(usize, usize)>, &'a str, &'a str);

/// `start-end perms offset dev inode [path]`: a mapping's first line in smaps.
fn mapping_header(line: &str) -> Option<Header<'_>> {
    let mut parts = line.splitn(6, ' ');
    let range = parts.next()?;
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = parts.next()?;
    // offset, device, inode
    for _ in 0..3 {
        parts.next()?;
    }
    let path = parts.next().unwrap_or("").trim_start();
    let range = (end > start).then_some((start, end));
    Some((range, perms, path))
}

/// `Name:   123 kB`.
fn field_kb(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.trim();
    rest.strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55b6bd26e000-55b6bd6b3000 r--p 00000000 fd:01 123 /opt/ambit/bin/ambit
Size:               4372 kB
Rss:                1800 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
55b6bd6b3000-55b6becb1000 r-xp 00444000 fd:01 123 /opt/ambit/bin/ambit
Size:              22520 kB
Rss:               11128 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
55b6becb1000-55b6bed24000 r--p 01a41000 fd:01 123 /opt/ambit/bin/ambit
Size:                460 kB
Rss:                 456 kB
Private_Dirty:       456 kB
Anonymous:           456 kB
VmFlags: rd mr mw me ac
55b6bed24000-55b6bed26000 rw-p 01ab3000 fd:01 123 /opt/ambit/bin/ambit
Rss:                   8 kB
Anonymous:             8 kB
55b6bed26000-55b6bed28000 rw-p 00000000 00:00 0 
Rss:                   8 kB
Anonymous:             8 kB
7fa02a9cb000-7fa02ab21000 r-xp 00028000 fd:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 980 kB
Anonymous:             0 kB
7fa02ac00000-7fa02ac10000 r-xp 00000000 fd:01 99 /opt/ambit/bin/ambit (deleted)
Rss:                  64 kB
Anonymous:             0 kB
";

    #[test]
    fn only_the_executables_clean_read_only_mappings_are_candidates() {
        let found = candidates(SMAPS, "/opt/ambit/bin/ambit");
        assert_eq!(
            found,
            [
                Candidate {
                    start: 0x55b6bd26e000,
                    end: 0x55b6bd6b3000,
                    resident_bytes: 1800 * 1024,
                },
                Candidate {
                    start: 0x55b6bd6b3000,
                    end: 0x55b6becb1000,
                    resident_bytes: 11128 * 1024,
                },
            ]
        );
        // A replaced binary's maps say "(deleted)", and so does /proc/self/exe.
        let deleted = candidates(SMAPS, "/opt/ambit/bin/ambit (deleted)");
        assert_eq!(deleted.len(), 1);
        assert_eq!(deleted[0].start, 0x7fa02ac00000);
        assert!(candidates(SMAPS, "/other").is_empty());
    }

    #[test]
    fn a_mapping_with_a_private_page_is_kept() {
        let patched = SMAPS.replacen(
            "Rss:               11128 kB\nPrivate_Dirty:         0 kB\nAnonymous:             0 kB",
            "Rss:               11128 kB\nPrivate_Dirty:         4 kB\nAnonymous:             4 kB",
            1,
        );
        let found = candidates(&patched, "/opt/ambit/bin/ambit");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].start, 0x55b6bd26e000);
    }

    #[test]
    fn garbage_lines_are_ignored() {
        assert!(candidates("not smaps\n\n-\nzz-yy r-xp", "/x").is_empty());
        assert_eq!(field_kb("Rss:   12 kB", "Rss:"), Some(12));
        assert_eq!(field_kb("Rss:   12", "Rss:"), None);
    }

    /// The real thing on this test process: its executable's clean pages go, the process
    /// goes on running code from them, and they come back as they are used.
    #[test]
    fn unmapping_this_process_code_keeps_it_running() {
        let resident = || -> u64 {
            let exe = std::fs::read_link("/proc/self/exe").unwrap();
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            candidates(&smaps, &exe.to_string_lossy())
                .iter()
                .map(|c| c.resident_bytes)
                .sum()
        };
        let before = resident();
        assert!(before > 0, "the test binary's code is resident");
        let done = unmap_startup_code().unwrap();
        assert!(done.mappings >= 1);
        assert!(done.resident_bytes > 0);
        let after = resident();
        assert!(
            after < before,
            "resident code went from {before} to {after} bytes"
        );
        // Code runs on, mapped back as needed.
        let text: String = (0..1000).map(|i| format!("{i:x}")).collect();
        assert!(text.len() > 1000);
        assert_eq!(field_kb("Rss: 1 kB", "Rss:"), Some(1));
    }
}
