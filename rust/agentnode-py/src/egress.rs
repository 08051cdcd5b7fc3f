//! `EgressHandle`: egress enforcement on one cgroup2 node (`agentnode_core::egress`). Python
//! (`agentnode.egress`) parses policies; this layer only moves fixed-shape values across.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentnode_core::egress::{self, CidrRule, DnsRedirect, Egress, Limits, PortRange, Programs};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use crate::errors::{with_open, NativeError};

// Addresses as borrowed bytes: extracting a `Vec<u8>` walks the bytes as a sequence of ints,
// which for a 10k-rule policy costs more than the kernel update.
const PACKED_RULE: usize = 22;

type RawRule = (PyBackedBytes, u8, Vec<(u16, u16, u8)>);

fn addr16(b: &[u8]) -> Result<[u8; 16], NativeError> {
    b.try_into().map_err(|_| {
        egress::Error::Policy(format!("an address must be 16 bytes, got {}", b.len())).into()
    })
}

fn ports(raw: &[(u16, u16, u8)]) -> Vec<PortRange> {
    raw.iter()
        .map(|&(lo, hi, proto)| PortRange { lo, hi, proto })
        .collect()
}

fn rules(raw: Vec<RawRule>) -> Result<Vec<CidrRule>, NativeError> {
    raw.into_iter()
        .map(|(addr, prefix, p)| {
            Ok(CidrRule {
                addr: addr16(&addr)?,
                prefix,
                ports: ports(&p),
            })
        })
        .collect()
}

fn dns(v4: Option<Vec<u8>>, v6: Option<Vec<u8>>, port: u16) -> Result<DnsRedirect, NativeError> {
    let v4 = v4
        .map(|b| {
            <[u8; 4]>::try_from(b.as_slice()).map_err(|_| {
                NativeError::from(egress::Error::Policy(
                    "the DNS forwarder's IPv4 address must be 4 bytes".into(),
                ))
            })
        })
        .transpose()?;
    let v6 = v6.map(|b| addr16(&b)).transpose()?;
    Ok(DnsRedirect { v4, v6, port })
}

/// The node's egress programs and maps, loaded once; every `EgressHandle` attaches these.
/// Their denials, of every task, are read here.
#[pyclass(module = "agentnode._native")]
pub struct EgressPrograms {
    inner: Arc<Programs>,
}

// pyo3 extracts arguments as owned values; borrowing them would not save a copy.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl EgressPrograms {
    /// Loads the programs; with `pin` (a directory on a bpffs), takes over those pinned there,
    /// or loads them and pins them there.
    #[new]
    #[pyo3(signature = (*, pin=None))]
    fn new(py: Python<'_>, pin: Option<PathBuf>) -> PyResult<Self> {
        let inner = py
            .detach(|| Programs::load(pin.as_deref()))
            .map_err(NativeError::from)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Removes the pins (the programs go once nothing holds them). Idempotent.
    fn unpin(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py
            .detach(|| self.inner.unpin())
            .map_err(NativeError::from)?)
    }

    /// Removes the entries of every task whose id is not in `keep`; returns how many went.
    fn purge(&self, py: Python<'_>, keep: HashSet<u64>) -> PyResult<usize> {
        Ok(py
            .detach(|| self.inner.purge(&keep))
            .map_err(NativeError::from)?)
    }

    /// Denials queued since the last call, of every task:
    /// `(time_ns, cgroup_id, addr16, port, proto, reason, pid)`.
    #[allow(clippy::type_complexity)]
    fn denials(&self, py: Python<'_>) -> Vec<(u64, u64, Vec<u8>, u16, u8, &'static str, u32)> {
        py.detach(|| self.inner.denials())
            .into_iter()
            .map(|d| {
                let reason = match d.reason {
                    egress::DenialReason::Policy => "policy",
                    egress::DenialReason::ConnRate => "conn_rate",
                    egress::DenialReason::Backstop => "backstop",
                    egress::DenialReason::NoEntry => "no_entry",
                };
                (
                    d.time_ns,
                    d.cgroup_id,
                    d.addr.to_vec(),
                    d.port,
                    d.proto,
                    reason,
                    d.pid,
                )
            })
            .collect()
    }

    /// A file descriptor that polls readable when denials are queued.
    fn events_fd(&self) -> i32 {
        self.inner.events_fd()
    }
}

/// Egress enforcement attached to one cgroup2 directory; `close()` (or garbage collection, or
/// process exit) detaches it.
#[pyclass(module = "agentnode._native")]
pub struct EgressHandle {
    inner: Mutex<Option<Egress>>,
}

impl EgressHandle {
    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Egress) -> Result<T, egress::Error> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        with_open(py, &self.inner, NativeError::Closed, f)
    }
}

// pyo3 extracts arguments as owned values; borrowing them would not save a copy.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl EgressHandle {
    /// Attaches `programs` to `cgroup_dir` for a task; with `pin` (a new directory on a bpffs),
    /// its links are pinned there so it outlives this handle and its process. With `adopt`,
    /// takes over the task pinned at `pin` instead (its entry brought to the rules, limits and
    /// DNS given).
    #[new]
    #[pyo3(signature = (programs, cgroup_dir, rules_, *, rate_bps=0, conn_per_sec=0, dns_v4=None, dns_v6=None, dns_port=0, pin=None, adopt=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        programs: &EgressPrograms,
        cgroup_dir: PathBuf,
        rules_: Vec<RawRule>,
        rate_bps: u64,
        conn_per_sec: u64,
        dns_v4: Option<Vec<u8>>,
        dns_v6: Option<Vec<u8>>,
        dns_port: u16,
        pin: Option<PathBuf>,
        adopt: bool,
    ) -> PyResult<Self> {
        let rules = rules(rules_)?;
        let dns = dns(dns_v4, dns_v6, dns_port)?;
        let limits = Limits {
            rate_bps,
            conn_per_sec,
        };
        let programs = Arc::clone(&programs.inner);
        let e = py
            .detach(|| match (&pin, adopt) {
                (Some(dir), true) => Egress::open(programs, &cgroup_dir, dir, &rules, limits, dns),
                (None, true) => Err(egress::Error::Policy(
                    "adopt needs the pin directory".into(),
                )),
                (_, false) => {
                    Egress::attach(programs, &cgroup_dir, &rules, limits, dns, pin.as_deref())
                }
            })
            .map_err(NativeError::from)?;
        Ok(Self {
            inner: Mutex::new(Some(e)),
        })
    }

    /// Removes the pinned directory `dir` and its pins (of a task that is gone); returns
    /// whether there was one.
    #[staticmethod]
    fn remove_pins(py: Python<'_>, dir: PathBuf) -> PyResult<bool> {
        Ok(py
            .detach(|| egress::remove_pins(&dir))
            .map_err(NativeError::from)?)
    }

    /// Withdraws the task's entry: its programs stay attached and deny it everything until
    /// `close()`. Idempotent.
    fn withdraw(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, Egress::withdraw)
    }

    /// The task's id (its cgroup's id), as its denials carry it.
    fn id(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |e| Ok(e.id()))
    }

    /// Removes this enforcement's pins: `close()` then detaches it. Idempotent.
    fn unpin(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, Egress::unpin)
    }

    /// Closes the handle leaving the pinned enforcement in force (for a later owner to adopt).
    fn leave(&self, py: Python<'_>) {
        py.detach(|| {
            let mut inner = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(e) = inner.as_mut() {
                e.leave();
            }
            inner.take()
        });
    }

    /// Replaces the CIDR rules (live map update).
    fn set_rules(&self, py: Python<'_>, rules_: Vec<RawRule>) -> PyResult<()> {
        let rules = rules(rules_)?;
        self.with(py, |e| e.set_rules(&rules))
    }

    /// Replaces the CIDR rules with ones packed as 22-byte records: address (16 bytes), prefix
    /// (1), low and high port (2 each, little-endian), protocol bits (1). The fast path for
    /// large policies: no Python object per rule crosses over.
    fn set_rules_packed(&self, py: Python<'_>, packed: &[u8]) -> PyResult<()> {
        if packed.len() % PACKED_RULE != 0 {
            return Err(NativeError::from(egress::Error::Policy(format!(
                "packed rules are {PACKED_RULE}-byte records; got {} bytes",
                packed.len()
            )))
            .into());
        }
        self.with(py, |e| {
            e.set_rule_ranges(packed.chunks_exact(PACKED_RULE).map(|r| {
                let addr: [u8; 16] = r[..16].try_into().expect("16 bytes");
                let port = |i: usize| u16::from_le_bytes([r[i], r[i + 1]]);
                let ports = PortRange {
                    lo: port(17),
                    hi: port(19),
                    proto: r[21],
                };
                (addr, r[16], ports)
            }))
        })
    }

    /// Replaces the rate limits (0: unlimited).
    #[pyo3(signature = (*, rate_bps, conn_per_sec))]
    fn set_limits(&self, py: Python<'_>, rate_bps: u64, conn_per_sec: u64) -> PyResult<()> {
        self.with(py, |e| {
            e.set_limits(Limits {
                rate_bps,
                conn_per_sec,
            })
        })
    }

    /// Allows one address (16 bytes) on `ports` for `ttl` seconds.
    fn allow_exact(
        &self,
        py: Python<'_>,
        addr: Vec<u8>,
        ports_: Vec<(u16, u16, u8)>,
        ttl: f64,
    ) -> PyResult<()> {
        let addr = addr16(&addr)?;
        let ports = ports(&ports_);
        let ttl = Duration::try_from_secs_f64(ttl)
            .map_err(|_| NativeError::from(egress::Error::Policy(format!("bad TTL {ttl} s"))))?;
        self.with(py, |e| e.allow_exact(addr, &ports, ttl))
    }

    /// Removes expired exact-IP entries; returns how many.
    fn expire_exact(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, Egress::expire_exact)
    }

    /// Forgets every DNS-learned address; returns how many.
    fn clear_exact(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, Egress::clear_exact)
    }

    /// The number of CIDR entries in the kernel maps.
    fn rule_entries(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |e| Ok(e.rule_entries()))
    }

    /// Counters summed over CPUs, as a dict of ints.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.with(py, |e| e.counters())?;
        let d = PyDict::new(py);
        d.set_item("bytes_out", c.bytes_out)?;
        d.set_item("packets_out", c.packets_out)?;
        d.set_item("bytes_in", c.bytes_in)?;
        d.set_item("packets_in", c.packets_in)?;
        d.set_item("connections_allowed", c.connections_allowed)?;
        d.set_item("connections_denied", c.connections_denied)?;
        d.set_item("packets_dropped", c.packets_dropped)?;
        d.set_item("rate_dropped", c.rate_dropped)?;
        d.set_item("dns_redirected", c.dns_redirected)?;
        Ok(d)
    }

    /// Detaches every program and withdraws the task's entry; idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            self.inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        });
    }

    /// Whether `close()` has run.
    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }
}

/// A name for this build's egress programs (a hash of the object), which their pins carry.
#[pyfunction]
fn egress_programs_tag() -> String {
    egress::programs_tag()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(egress_programs_tag, m)?)?;
    m.add_class::<EgressPrograms>()?;
    m.add_class::<EgressHandle>()
}
