//! Policy compilation: CIDR rules become map entries (single addresses in a hash, the rest in an
//! LPM trie). Only the longest matching prefix answers, so each entry also carries the port
//! ranges of every shorter rule covering it; otherwise `10.0.0.0/8:443` would stop applying
//! inside a more specific `10.1.0.0/16:80`.

use super::maps::{RawConfig, RawPorts, MAX_RANGES, NSEC_PER_SEC};
use super::{DnsRedirect, Error, Result};

pub const PROTO_TCP: u8 = 1;
pub const PROTO_UDP: u8 = 2;

/// An inclusive port range for a set of protocols (`PROTO_TCP | PROTO_UDP` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    pub proto: u8,
}

/// Destinations `addr/prefix` (16 bytes; IPv4 as `::ffff:a.b.c.d` with `prefix` + 96) on `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrRule {
    pub addr: [u8; 16],
    pub prefix: u8,
    pub ports: Vec<PortRange>,
}

/// Rate limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per second out of the task.
    pub rate_bps: u64,
    /// New connections (and unconnected datagram sends) per second.
    pub conn_per_sec: u64,
}

fn mask(addr: [u8; 16], prefix: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, byte) in addr.iter().enumerate() {
        let bits = (i32::from(prefix) - 8 * i as i32).clamp(0, 8);
        out[i] = if bits == 0 {
            0
        } else {
            byte & (0xffu8 << (8 - bits))
        };
    }
    out
}

/// Merges overlapping or adjacent ranges per protocol bit; the result is sorted.
pub(super) fn normalise(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut out: Vec<PortRange> = Vec::new();
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut mine: Vec<(u16, u16)> = ranges
            .iter()
            .filter(|r| r.proto & proto != 0)
            .map(|r| (r.lo, r.hi))
            .collect();
        mine.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::new();
        for (lo, hi) in mine {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        out.extend(
            merged
                .into_iter()
                .map(|(lo, hi)| PortRange { lo, hi, proto }),
        );
    }
    // A range allowed for both protocols takes one slot, not two.
    let mut both: Vec<PortRange> = Vec::new();
    for r in out {
        if let Some(b) = both
            .iter_mut()
            .find(|b| b.lo == r.lo && b.hi == r.hi && b.proto != r.proto)
        {
            b.proto |= r.proto;
        } else {
            both.push(r);
        }
    }
    both.sort_unstable();
    both
}

/// A map key: (prefix length, masked address).
pub(super) type RuleKey = (u8, [u8; 16]);

/// One map entry: its key and the ports it allows.
pub(super) type Entry = (RuleKey, RawPorts);

/// Validates `rules` and returns the map entries, sorted by (prefix, masked address) with
/// unique keys. Sorted output lets a live update diff two policies by one merge walk, and the
/// common case (one port range, nothing inherited) allocates nothing per entry.
pub(super) fn compile(rules: &[CidrRule]) -> Result<Vec<Entry>> {
    if rules.iter().any(|r| r.ports.is_empty()) {
        return Err(Error::Policy("a rule without ports allows nothing".into()));
    }
    compile_ranges(
        rules
            .iter()
            .flat_map(|r| r.ports.iter().map(|p| (r.addr, r.prefix, *p))),
    )
}

/// `compile` for rules given as (address, prefix, one port range) each.
pub(super) fn compile_ranges(
    rules: impl Iterator<Item = ([u8; 16], u8, PortRange)>,
) -> Result<Vec<Entry>> {
    let mut flat: Vec<(RuleKey, PortRange)> = Vec::with_capacity(rules.size_hint().0);
    let mut lengths = [false; 129];
    for (addr, prefix, p) in rules {
        if prefix > 128 {
            return Err(Error::Policy(format!("prefix length {prefix} is over 128")));
        }
        if p.lo > p.hi || p.proto & (PROTO_TCP | PROTO_UDP) == 0 || p.proto > 3 {
            return Err(Error::Policy(format!(
                "bad port range {}-{} (protocols {:#x})",
                p.lo, p.hi, p.proto
            )));
        }
        flat.push(((prefix, mask(addr, prefix)), p));
        lengths[usize::from(prefix)] = true;
    }
    flat.sort_unstable();
    // (key, start, end) of each key's run of ranges in `flat`.
    let mut groups: Vec<(RuleKey, usize, usize)> = Vec::with_capacity(flat.len());
    for (i, (key, _)) in flat.iter().enumerate() {
        match groups.last_mut() {
            Some((k, _, end)) if k == key => *end = i + 1,
            _ => groups.push((*key, i, i + 1)),
        }
    }
    let shorter: Vec<u8> = (0..=128u8).filter(|&l| lengths[usize::from(l)]).collect();
    let mut out = Vec::with_capacity(groups.len());
    let mut all: Vec<PortRange> = Vec::new();
    for &((prefix, addr), start, end) in &groups {
        all.clear();
        all.extend(flat[start..end].iter().map(|(_, p)| *p));
        for &q in shorter.iter().take_while(|&&q| q < prefix) {
            let covering = (q, mask(addr, q));
            if let Ok(i) = groups.binary_search_by(|g| g.0.cmp(&covering)) {
                let (_, s, e) = groups[i];
                all.extend(flat[s..e].iter().map(|(_, p)| *p));
            }
        }
        // One valid range is already normal.
        let raw = if all.len() == 1 {
            RawPorts::from_ranges(&all)
        } else {
            RawPorts::from_ranges(&normalise(&all))
        }
        .map_err(|n| {
            Error::Policy(format!(
                "{n} distinct port ranges apply to one network (at most {MAX_RANGES}); merge them"
            ))
        })?;
        out.push(((prefix, addr), raw));
    }
    Ok(out)
}

/// What turns maps holding `old` into maps holding `new` (both as `compile` returns them):
/// the entries to write (new or changed) and the keys to remove.
pub(super) fn diff(old: &[Entry], new: &[Entry]) -> (Vec<Entry>, Vec<RuleKey>) {
    let (mut write, mut remove) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.0 == n.0 => {
                if o.1 != n.1 {
                    write.push(*n);
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.0 < n.0 => {
                remove.push(o.0);
                i += 1;
            }
            (Some(o), None) => {
                remove.push(o.0);
                i += 1;
            }
            (_, Some(n)) => {
                write.push(*n);
                j += 1;
            }
            (None, None) => unreachable!("the loop condition"),
        }
    }
    (write, remove)
}

// The kernel layouts built from policy types live here, so that `maps` (the layouts alone)
// depends on no policy type: policy -> maps, one direction.
impl RawPorts {
    /// Fails with the number of ranges when there are more than the kernel struct holds.
    pub fn from_ranges(ranges: &[PortRange]) -> std::result::Result<Self, usize> {
        if ranges.len() > MAX_RANGES {
            return Err(ranges.len());
        }
        let mut p = Self::default();
        for (i, r) in ranges.iter().enumerate() {
            p.lo[i] = r.lo;
            p.hi[i] = r.hi;
            p.proto[i] = r.proto;
        }
        p.n = ranges.len() as u8;
        Ok(p)
    }

    pub fn ranges(&self) -> impl Iterator<Item = PortRange> + '_ {
        (0..usize::from(self.n).min(MAX_RANGES)).map(|i| PortRange {
            lo: self.lo[i],
            hi: self.hi[i],
            proto: self.proto[i],
        })
    }
}

impl RawConfig {
    pub fn new(limits: &Limits, dns: &DnsRedirect) -> Self {
        // The byte clock may run 2 s ahead (packets wait in fq for their EDT slot; TCP small
        // queues keep about 1 MB queued per socket) or two 64 KiB TSO segments, whichever is
        // more: a horizon shorter than one segment's cost would never let that segment through.
        let rate_burst_ns = (2 * 65536 * NSEC_PER_SEC)
            .checked_div(limits.rate_bps)
            .map_or(0, |segments| segments.max(NSEC_PER_SEC / 100));
        // A burst of up to one second's worth of connections.
        let conn_burst_ns = if limits.conn_per_sec == 0 {
            0
        } else {
            NSEC_PER_SEC
        };
        Self {
            dns4: dns.v4.unwrap_or_default(),
            dns6: dns.v6.unwrap_or_default(),
            dns_port: dns.port.to_be(),
            pad: 0,
            rate_bps: limits.rate_bps,
            rate_burst_ns,
            conn_per_sec: limits.conn_per_sec,
            conn_burst_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], prefix: u8, lo: u16, hi: u16) -> CidrRule {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&a);
        CidrRule {
            addr,
            prefix: prefix + 96,
            ports: vec![PortRange {
                lo,
                hi,
                proto: PROTO_TCP,
            }],
        }
    }

    #[test]
    fn shorter_rules_are_inherited_by_longer_ones() {
        let m = compile(&[
            v4([10, 0, 0, 0], 8, 443, 443),
            v4([10, 1, 0, 0], 16, 80, 80),
        ])
        .unwrap();
        let key = (112, v4([10, 1, 0, 0], 16, 0, 0).addr);
        let (_, inner) = m.iter().find(|(k, _)| *k == key).unwrap();
        let got: Vec<PortRange> = inner.ranges().collect();
        assert_eq!(
            got.iter().map(|r| (r.lo, r.hi)).collect::<Vec<_>>(),
            [(80, 80), (443, 443)]
        );
    }

    #[test]
    fn host_bits_are_masked_and_ranges_merged() {
        let m = compile(&[v4([10, 0, 0, 7], 24, 1, 10), v4([10, 0, 0, 9], 24, 5, 20)]).unwrap();
        assert_eq!(m.len(), 1);
        let ((_, addr), ports) = m[0];
        assert_eq!(addr[15], 0);
        assert_eq!(
            ports.ranges().map(|r| (r.lo, r.hi)).collect::<Vec<_>>(),
            [(1, 20)]
        );
    }

    #[test]
    fn too_many_ranges_and_bad_prefix_are_errors() {
        let many: Vec<CidrRule> = (0..9)
            .map(|i| v4([10, 0, 0, 0], 8, i * 10, i * 10))
            .collect();
        assert!(matches!(compile(&many), Err(Error::Policy(_))));
        let mut bad = v4([10, 0, 0, 0], 8, 1, 1);
        bad.prefix = 129;
        assert!(compile(&[bad]).unwrap_err().to_string().contains("129"));
    }

    #[test]
    fn tcp_and_udp_share_a_slot() {
        let r = normalise(&[
            PortRange {
                lo: 53,
                hi: 53,
                proto: PROTO_TCP,
            },
            PortRange {
                lo: 53,
                hi: 53,
                proto: PROTO_UDP,
            },
        ]);
        assert_eq!(
            r,
            [PortRange {
                lo: 53,
                hi: 53,
                proto: 3
            }]
        );
    }

    #[test]
    fn diff_writes_new_and_changed_entries_and_removes_stale_ones() {
        let old = compile(&[
            v4([10, 0, 0, 1], 32, 80, 80),
            v4([10, 0, 0, 2], 32, 80, 80),
            v4([10, 0, 0, 3], 32, 80, 80),
        ])
        .unwrap();
        let new = compile(&[
            v4([10, 0, 0, 2], 32, 80, 80),
            v4([10, 0, 0, 3], 32, 81, 81),
            v4([10, 0, 0, 4], 32, 80, 80),
        ])
        .unwrap();
        let (write, remove) = diff(&old, &new);
        let last = |k: &(u8, [u8; 16])| k.1[15];
        assert_eq!(
            write.iter().map(|(k, _)| last(k)).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(remove.iter().map(last).collect::<Vec<_>>(), [1]);
        assert_eq!(diff(&new, &new), (vec![], vec![]));
        let (write, remove) = diff(&[], &new);
        assert_eq!((write.len(), remove.len()), (3, 0));
    }

    #[test]
    fn compile_output_is_sorted_and_unique() {
        let m = compile(&[
            v4([10, 0, 0, 9], 32, 10, 10),
            v4([10, 0, 0, 0], 8, 20, 20),
            v4([10, 0, 0, 9], 32, 30, 30),
        ])
        .unwrap();
        assert!(m.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(m.len(), 2);
        // The /32 has its own two ranges and the /8's.
        assert_eq!(m[1].1.ranges().count(), 3);
    }
}
