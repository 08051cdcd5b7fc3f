//! Policy compilation: CIDR rules become LPM-trie entries. The trie answers only the longest
//! matching prefix, so each entry also carries the port ranges of every shorter rule covering
//! it; otherwise `10.0.0.0/8:443` would stop applying inside a more specific `10.1.0.0/16:80`.

use std::collections::{BTreeSet, HashMap};

use super::maps::{RawPorts, MAX_RANGES};
use super::{Error, Result};

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

/// Validates `rules` and returns the trie entries keyed by (prefix, masked address).
pub(super) fn compile(rules: &[CidrRule]) -> Result<HashMap<(u8, [u8; 16]), RawPorts>> {
    let mut entries: HashMap<(u8, [u8; 16]), Vec<PortRange>> = HashMap::with_capacity(rules.len());
    for r in rules {
        if r.prefix > 128 {
            return Err(Error::Policy(format!(
                "prefix length {} is over 128",
                r.prefix
            )));
        }
        if r.ports.is_empty() {
            return Err(Error::Policy("a rule without ports allows nothing".into()));
        }
        for p in &r.ports {
            if p.lo > p.hi || p.proto & (PROTO_TCP | PROTO_UDP) == 0 || p.proto > 3 {
                return Err(Error::Policy(format!(
                    "bad port range {}-{} (protocols {:#x})",
                    p.lo, p.hi, p.proto
                )));
            }
        }
        entries
            .entry((r.prefix, mask(r.addr, r.prefix)))
            .or_default()
            .extend(&r.ports);
    }
    let lengths: BTreeSet<u8> = entries.keys().map(|&(p, _)| p).collect();
    let mut out = HashMap::with_capacity(entries.len());
    for (&(prefix, addr), ports) in &entries {
        let mut all = ports.clone();
        for &shorter in lengths.range(..prefix) {
            if let Some(inherited) = entries.get(&(shorter, mask(addr, shorter))) {
                all.extend(inherited);
            }
        }
        let ranges = normalise(&all);
        let raw = RawPorts::from_ranges(&ranges).map_err(|n| {
            Error::Policy(format!(
                "{n} distinct port ranges apply to one network (at most {MAX_RANGES}); merge them"
            ))
        })?;
        out.insert((prefix, addr), raw);
    }
    Ok(out)
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
        let inner = m.get(&(112, v4([10, 1, 0, 0], 16, 0, 0).addr)).unwrap();
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
        let (&(_, addr), ports) = m.iter().next().unwrap();
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
}
