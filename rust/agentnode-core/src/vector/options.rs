//! A collection's shape: its metric, scalar type and HNSW parameters, and how each maps onto
//! usearch's own.

use std::str::FromStr;

use usearch::{IndexOptions, MetricKind, ScalarKind};

use super::{Error, Result, MAX_DIMS};

/// Distance between vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Cos,
    L2,
    Ip,
}

impl FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cos" => Ok(Self::Cos),
            "l2" => Ok(Self::L2),
            "ip" => Ok(Self::Ip),
            _ => Err(Error::BadMetric(s.to_owned())),
        }
    }
}

impl Metric {
    /// The distance usearch reports under this metric, for the exact plan's scan.
    pub(super) fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Self::Ip => 1.0 - lanes(a, b, |x, y| x * y),
            Self::L2 => lanes(a, b, |x, y| (x - y) * (x - y)),
            Self::Cos => {
                let ab = lanes(a, b, |x, y| x * y);
                let norms = (lanes(a, a, |x, y| x * y) * lanes(b, b, |x, y| x * y)).sqrt();
                if norms > 0.0 {
                    1.0 - ab / norms
                } else {
                    1.0
                }
            }
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Cos => "cos",
            Self::L2 => "l2",
            Self::Ip => "ip",
        }
    }

    pub(super) fn kind(self) -> MetricKind {
        match self {
            Self::Cos => MetricKind::Cos,
            Self::L2 => MetricKind::L2sq,
            Self::Ip => MetricKind::IP,
        }
    }
}

/// The sum of `f(a[i], b[i])`, in eight independent partial sums so the compiler vectorises
/// it (floating-point addition is not associative, so one running sum would stay scalar).
pub(super) fn lanes(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| f(*x, *y))
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += f(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// How the index stores each scalar; vectors always arrive as f32 and are quantised on add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    I8,
    /// The graph in i8 and an exact f32 copy of every vector beside it: a search walks the
    /// small graph and ranks all `ef` candidates it kept (usearch keeps `ef` whatever `k` is)
    /// by their exact distance. A quarter of the memory traffic per comparison of f32, so
    /// about twice the queries per second at equal recall, for a fifth more memory.
    /// Cos only: the graph holds unit vectors on an i8 scale fixed by the first vectors added
    /// (see [`super::quantise::i8_scale`]), so vectors are normalised.
    I8F32,
}

impl FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "i8" => Ok(Self::I8),
            "i8+f32" => Ok(Self::I8F32),
            _ => Err(Error::BadDtype(s.to_owned())),
        }
    }
}

impl Dtype {
    pub(super) fn kind(self) -> ScalarKind {
        match self {
            Self::F32 => ScalarKind::F32,
            Self::F16 => ScalarKind::F16,
            Self::I8 | Self::I8F32 => ScalarKind::I8,
        }
    }
}

/// A collection's shape and HNSW parameters (0 = usearch's default).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub dims: usize,
    pub metric: Metric,
    pub dtype: Dtype,
    pub connectivity: usize,
    pub expansion_add: usize,
    pub expansion_search: usize,
}

impl Options {
    /// The graph's metric: an `i8+f32` graph holds unit vectors, on which inner product ranks
    /// as cos does and skips cos's two norms per comparison.
    pub(super) fn graph_metric(&self) -> Result<MetricKind> {
        match (self.dtype, self.metric) {
            (Dtype::I8F32, Metric::Cos) => Ok(MetricKind::IP),
            (Dtype::I8F32, other) => Err(Error::RescoreMetric(other.name())),
            (_, metric) => Ok(metric.kind()),
        }
    }

    pub(super) fn usearch(&self) -> Result<IndexOptions> {
        if self.dims == 0 || self.dims > MAX_DIMS {
            return Err(Error::BadDims(self.dims));
        }
        Ok(IndexOptions {
            dimensions: self.dims,
            metric: self.graph_metric()?,
            quantization: self.dtype.kind(),
            connectivity: self.connectivity,
            expansion_add: self.expansion_add,
            expansion_search: self.expansion_search,
            multi: false,
        })
    }
}
