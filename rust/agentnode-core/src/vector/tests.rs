use super::collection::INITIAL_CAPACITY;
use super::planner::{plan, Plan};
use super::quantise::{i8_scale, quantise};
use super::*;

fn opts(dims: usize) -> Options {
    Options {
        dims,
        metric: Metric::L2,
        dtype: Dtype::F32,
        connectivity: 0,
        expansion_add: 0,
        expansion_search: 0,
    }
}

fn label(tenant: &str) -> Label {
    Label {
        tenant: tenant.to_owned(),
        namespace: "ns".to_owned(),
        task: "t".to_owned(),
        payload: b"{}".to_vec(),
    }
}

/// Deterministic pseudo-random vectors (xorshift), so tests need no rand crate.
fn vectors(n: usize, dims: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n * dims)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            f32::from((s % 1000) as u16) / 1000.0
        })
        .collect()
}

#[test]
fn upsert_search_delete() {
    let c = Collection::new(opts(4)).unwrap();
    c.upsert(1, &[0.0, 0.0, 0.0, 1.0], label("a")).unwrap();
    c.upsert(2, &[1.0, 0.0, 0.0, 0.0], label("a")).unwrap();
    let hits = c
        .search(&[0.9, 0.0, 0.0, 0.0], 1, &Filter::default())
        .unwrap();
    assert_eq!(hits[0].key, 2);
    // Upsert replaces the vector in place.
    c.upsert(2, &[0.0, 0.0, 1.0, 0.0], label("a")).unwrap();
    assert_eq!(c.len(), 2);
    let hits = c
        .search(&[0.0, 0.0, 0.9, 0.0], 1, &Filter::default())
        .unwrap();
    assert_eq!(hits[0].key, 2);
    assert!(c.delete(2).unwrap());
    assert!(!c.delete(2).unwrap());
    assert_eq!(c.len(), 1);
    assert!(c.label(2).is_none());
}

#[test]
fn bad_input_is_rejected() {
    let c = Collection::new(opts(4)).unwrap();
    assert!(matches!(
        c.upsert(1, &[0.0; 3], label("a")),
        Err(Error::Dimension { got: 3, want: 4 })
    ));
    assert!(matches!(
        c.upsert(u64::MAX, &[0.0; 4], label("a")),
        Err(Error::ReservedKey(_))
    ));
    assert!(matches!(
        c.upsert(1, &[f32::NAN, 0.0, 0.0, 0.0], label("a")),
        Err(Error::NotFinite(1))
    ));
    assert!(matches!(
        c.search(&[0.0; 4], 0, &Filter::default()),
        Err(Error::ZeroK)
    ));
    assert!(matches!(
        "cosine".parse::<Metric>(),
        Err(Error::BadMetric(_))
    ));
    assert!(matches!("f64".parse::<Dtype>(), Err(Error::BadDtype(_))));
    assert!(matches!(Collection::new(opts(0)), Err(Error::BadDims(0))));
}

#[test]
fn capacity_grows_past_the_initial_reservation() {
    let c = Collection::new(opts(8)).unwrap();
    let n = INITIAL_CAPACITY * 3 + 7;
    let keys: Vec<u64> = (0..n as u64).collect();
    let labels = vec![label("a"); n];
    c.upsert_batch(&keys, &vectors(n, 8, 7), labels, 4).unwrap();
    assert_eq!(c.len(), n);
    // A batch reserves what it needs, not the next power of two.
    assert_eq!(c.capacity(), n);
    for key in n as u64..n as u64 + 10 {
        c.upsert(key, &vectors(1, 8, key), label("a")).unwrap();
    }
    assert!(c.capacity() >= 2 * n);
}

#[test]
fn filters_run_inside_the_search() {
    let c = Collection::new(opts(8)).unwrap();
    let n = 2000;
    let keys: Vec<u64> = (0..n as u64).collect();
    let labels = (0..n)
        .map(|i| label(if i % 10 == 0 { "x" } else { "y" }))
        .collect();
    c.upsert_batch(&keys, &vectors(n, 8, 3), labels, 2).unwrap();
    let only_x = Filter {
        tenant: Some("x".to_owned()),
        ..Filter::default()
    };
    let hits = c.search(&vectors(1, 8, 99), 10, &only_x).unwrap();
    assert_eq!(hits.len(), 10);
    assert!(hits.iter().all(|h| h.key % 10 == 0));
    let nobody = Filter {
        tenant: Some("nobody".to_owned()),
        ..Filter::default()
    };
    assert!(c
        .search(&vectors(1, 8, 99), 10, &nobody)
        .unwrap()
        .is_empty());
    let keyset = Filter {
        keys: Some([5, 6].into_iter().collect()),
        ..Filter::default()
    };
    let mut got: Vec<u64> = c
        .search(&vectors(1, 8, 1), 10, &keyset)
        .unwrap()
        .iter()
        .map(|h| h.key)
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![5, 6]);
}

#[test]
fn save_load_round_trip_and_corruption() {
    let dir = std::env::temp_dir().join(format!("agentnode-vector-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.anvec");
    let c = Collection::new(opts(8)).unwrap();
    let keys: Vec<u64> = (10..110).collect();
    let data = vectors(100, 8, 5);
    c.upsert_batch(&keys, &data, vec![label("a"); 100], 2)
        .unwrap();
    c.save(&path).unwrap();
    let back = Collection::load(&path, opts(8)).unwrap();
    assert_eq!(back.len(), 100);
    assert_eq!(back.label(10), Some(label("a")));
    let q = &data[8..16];
    assert_eq!(back.search(q, 1, &Filter::default()).unwrap()[0].key, 11);
    // Wrong shape for the file.
    assert!(matches!(
        Collection::load(&path, opts(16)),
        Err(Error::Corrupt { .. })
    ));
    // One flipped byte fails the checksum.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Collection::load(&path, opts(8)),
        Err(Error::Corrupt { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plans_follow_selectivity() {
    // 100k vectors, k=10, ef=64: a handful of keys are scanned, a tenth is walked keeping
    // k admitted, half keeping half of ef, all keeping ef.
    assert_eq!(plan(50, 100_000, 10, 64), Plan::Exact);
    assert_eq!(plan(1_000, 100_000, 10, 64), Plan::Exact);
    assert_eq!(plan(10_000, 100_000, 10, 64), Plan::Graph { ef: 10 });
    // A tenth of 10k: 1000 rows scan faster than a walk keeping 10 of them.
    assert_eq!(plan(1_000, 10_000, 10, 64), Plan::Exact);
    assert_eq!(plan(50_000, 100_000, 10, 64), Plan::Graph { ef: 32 });
    assert_eq!(plan(100_000, 100_000, 10, 64), Plan::Graph { ef: 64 });
    // A k above ef: the walk keeps k.
    assert_eq!(plan(500_000, 1_000_000, 100, 64), Plan::Graph { ef: 100 });
}

/// Exact top-k keys of `query` among the rows `admit` accepts, by `metric`.
fn brute(
    metric: Metric,
    data: &[f32],
    dims: usize,
    query: &[f32],
    k: usize,
    admit: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let mut all: Vec<(f32, u64)> = data
        .chunks_exact(dims)
        .enumerate()
        .filter(|(i, _)| admit(*i as u64))
        .map(|(i, row)| (metric.distance(query, row), i as u64))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all.into_iter().take(k).map(|(_, key)| key).collect()
}

type Admit<'a> = dyn Fn(u64) -> bool + 'a;

#[test]
fn every_plan_matches_brute_force() {
    let (n, dims, k) = (4000, 16, 10);
    // Unit rows, so that inner product ranks like cosine (HNSW needs a metric-like distance).
    let unit = |v: Vec<f32>| -> Vec<f32> {
        v.chunks_exact(dims)
            .flat_map(|row| {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter().map(move |x| x / norm)
            })
            .collect()
    };
    let data = unit(vectors(n, dims, 11));
    for (metric, dtype) in [
        (Metric::Cos, Dtype::F32),
        (Metric::Ip, Dtype::F32),
        (Metric::L2, Dtype::F32),
        (Metric::Cos, Dtype::I8F32),
    ] {
        let c = Collection::new(Options {
            metric,
            dtype,
            ..opts(dims)
        })
        .unwrap();
        let keys: Vec<u64> = (0..n as u64).collect();
        // tenant: one in ten and task: one in two hundred (scanned); keys: a third (walked).
        let labels = (0..n)
            .map(|i| Label {
                tenant: format!("t{}", i % 10),
                namespace: "ns".to_owned(),
                task: format!("x{}", i % 200),
                payload: Vec::new(),
            })
            .collect();
        c.upsert_batch(&keys, &data, labels, 2).unwrap();
        let by_tenant = Filter {
            tenant: Some("t3".to_owned()),
            ..Filter::default()
        };
        let by_task = Filter {
            task: Some("x7".to_owned()),
            ..Filter::default()
        };
        let by_both = Filter {
            tenant: Some("t7".to_owned()),
            task: Some("x7".to_owned()),
            ..Filter::default()
        };
        let by_keys = Filter {
            keys: Some((0..n as u64).step_by(3).collect()),
            ..Filter::default()
        };
        // A region: the third of the rows with the largest first component, so that most
        // queries lie away from every admitted vector (walked).
        let mut firsts: Vec<f32> = data.iter().step_by(dims).copied().collect();
        firsts.sort_by(f32::total_cmp);
        let edge = firsts[n * 2 / 3];
        let in_region = |key: u64| data[key as usize * dims] >= edge;
        let by_region = Filter {
            keys: Some((0..n as u64).filter(|&key| in_region(key)).collect()),
            ..Filter::default()
        };
        let cases: [(&str, &Filter, &Admit<'_>); 5] = [
            ("tenant", &by_tenant, &|key| key % 10 == 3),
            ("task", &by_task, &|key| key % 200 == 7),
            ("tenant and task", &by_both, &|key| key % 200 == 7),
            ("keys", &by_keys, &|key| key % 3 == 0),
            ("region", &by_region, &in_region),
        ];
        for (name, filter, admit) in cases {
            let (mut found, mut total) = (0, 0);
            for q in 0..20 {
                let query = unit(vectors(1, dims, 1000 + q));
                let hits = c.search(&query, k, filter).unwrap();
                assert!(
                    hits.iter().all(|h| admit(h.key)),
                    "{metric:?} {dtype:?}: a hit fails the filter"
                );
                assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
                let truth = brute(metric, &data, dims, &query, k, admit);
                assert_eq!(hits.len(), truth.len());
                found += hits.iter().filter(|h| truth.contains(&h.key)).count();
                total += truth.len();
            }
            // recall >= 0.9, in integers
            assert!(
                found * 10 >= total * 9,
                "{metric:?} {dtype:?} by {name}: {found} of {total} found"
            );
        }
        // The exact scan reports the distances usearch would.
        let query = unit(vectors(1, dims, 5));
        let graph = c.search(&query, 1, &Filter::default()).unwrap()[0];
        let only = Filter {
            keys: Some([graph.key].into_iter().collect()),
            ..Filter::default()
        };
        let scanned = c.search(&query, 1, &only).unwrap()[0];
        assert_eq!(scanned.key, graph.key);
        assert!(
            (scanned.distance - graph.distance).abs() < 1e-4,
            "{metric:?} {dtype:?}: {scanned:?} vs {graph:?}"
        );
    }
}

#[test]
fn relabelled_and_deleted_keys_leave_their_filters() {
    let c = Collection::new(opts(4)).unwrap();
    c.upsert(1, &[1.0, 0.0, 0.0, 0.0], label("a")).unwrap();
    c.upsert(2, &[0.0, 1.0, 0.0, 0.0], label("a")).unwrap();
    c.upsert(1, &[1.0, 0.0, 0.0, 0.0], label("b")).unwrap();
    let only = |t: &str| Filter {
        tenant: Some(t.to_owned()),
        ..Filter::default()
    };
    let keys = |f: &Filter| -> Vec<u64> {
        c.search(&[1.0, 0.0, 0.0, 0.0], 5, f)
            .unwrap()
            .iter()
            .map(|h| h.key)
            .collect()
    };
    assert_eq!(keys(&only("a")), vec![2]);
    assert_eq!(keys(&only("b")), vec![1]);
    c.delete(1).unwrap();
    assert!(keys(&only("b")).is_empty());
}

/// A collection of `options` holding the rows of `data` under keys 0.., tenant "a".
fn filled(options: Options, data: &[f32]) -> Collection {
    let c = Collection::new(options).unwrap();
    let n = data.len() / options.dims;
    let keys: Vec<u64> = (0..n as u64).collect();
    c.upsert_batch(&keys, data, vec![label("a"); n], 2).unwrap();
    c
}

fn rescored(dims: usize) -> Options {
    Options {
        metric: Metric::Cos,
        dtype: Dtype::I8F32,
        ..opts(dims)
    }
}

#[test]
fn i8_f32_ranks_by_exact_distance() {
    let (n, dims) = (2000, 32);
    // Rows of any length: the collection normalises them.
    let data: Vec<f32> = vectors(n, dims, 3).iter().map(|x| x * 7.0 - 3.0).collect();
    let c = filled(rescored(dims), &data);
    // A walk this wide holds the exact nearest among its candidates whatever graph two
    // threads built (at usearch's default some builds miss 1 in 12), so what is tested is the
    // re-ranking, not the graph.
    c.set_expansion_search(300).unwrap();
    assert!(
        c.memory_usage() > n * dims * 4,
        "the exact copies are counted"
    );
    let mut first = 0;
    for q in 0..50 {
        let query: Vec<f32> = vectors(1, dims, 500 + q).iter().map(|x| x - 0.5).collect();
        let hits = c.search(&query, 5, &Filter::default()).unwrap();
        for h in &hits {
            let row = &data[h.key as usize * dims..(h.key as usize + 1) * dims];
            let exact = Metric::Cos.distance(&query, row);
            assert!((h.distance - exact).abs() < 1e-5, "{h:?} against {exact}");
        }
        assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
        first +=
            usize::from(hits[0].key == brute(Metric::Cos, &data, dims, &query, 1, |_| true)[0]);
    }
    assert!(first >= 49, "exact nearest first in {first} of 50");

    // An upsert replaces the exact copy too; a delete drops it.
    let far: Vec<f32> = (0..dims).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    c.upsert(7, &far, label("a")).unwrap();
    let hit = c.search(&far, 1, &Filter::default()).unwrap()[0];
    assert_eq!(hit.key, 7);
    assert!(hit.distance.abs() < 1e-6);
    c.delete(7).unwrap();
    assert!(c
        .search(&far, 10, &Filter::default())
        .unwrap()
        .iter()
        .all(|h| h.key != 7));
    // A new key takes the deleted key's row, and holds its own vector there.
    c.upsert(n as u64, &far, label("a")).unwrap();
    let hit = c.search(&far, 1, &Filter::default()).unwrap()[0];
    assert_eq!(hit.key, n as u64);
    assert!(hit.distance.abs() < 1e-6);
}

#[test]
fn i8_f32_input_is_checked() {
    for metric in [Metric::L2, Metric::Ip] {
        let err = Collection::new(Options {
            metric,
            ..rescored(4)
        })
        .err()
        .unwrap();
        assert!(matches!(err, Error::RescoreMetric(_)), "{err}");
        assert!(err.to_string().contains("needs metric cos"));
    }
    let c = Collection::new(rescored(4)).unwrap();
    for bad in [[0.0; 4], [f32::MAX; 4]] {
        let err = c.upsert(1, &bad, label("a")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the vector for key 1 is all zeros"),
            "{err}"
        );
        assert!(matches!(
            c.check_batch(&[1], &bad),
            Err(Error::ZeroVector(_))
        ));
        let err = c.search(&bad, 1, &Filter::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("the query is all zeros"),
            "{err}"
        );
    }
    assert!(c.is_empty());
    assert_eq!("i8+f32".parse::<Dtype>().unwrap(), Dtype::I8F32);
}

#[test]
fn i8_f32_save_load_round_trip() {
    let dir = std::env::temp_dir().join(format!("agentnode-vector-i8f32-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.anvec");
    let (n, dims) = (300, 16);
    let data = vectors(n, dims, 9);
    let c = filled(rescored(dims), &data);
    c.delete(5).unwrap();
    c.save(&path).unwrap();
    let back = Collection::load(&path, rescored(dims)).unwrap();
    assert_eq!(back.len(), n - 1);
    let query = &data[dims * 40..dims * 41];
    assert_eq!(
        back.search(query, 3, &Filter::default()).unwrap(),
        c.search(query, 3, &Filter::default()).unwrap()
    );
    // The file is bound to its dtype both ways.
    for other in [Dtype::F32, Dtype::I8] {
        let opts = Options {
            dtype: other,
            ..rescored(dims)
        };
        assert!(matches!(
            Collection::load(&path, opts),
            Err(Error::Corrupt { .. })
        ));
    }
    // The graph's scale comes back with it; a file whose scale is not one we write is refused.
    assert_eq!(back.scale.get(), c.scale.get());
    assert!(c.scale.get().is_some());
    let ([index, labels, exact], _) = file::read_checked(&path).unwrap();
    let mut bad = exact.clone();
    bad[..4].copy_from_slice(&1.0f32.to_le_bytes());
    file::write_atomic(&path, [&index, &labels, &bad]).unwrap();
    let err = Collection::load(&path, rescored(dims)).err().unwrap();
    assert!(err.to_string().contains("bad i8 scale 1"), "{err}");
    file::write_atomic(&path, [&index, &labels, &exact]).unwrap();
    // An empty collection has no scale yet, and takes one from its first vector after loading.
    let empty = Collection::new(rescored(dims)).unwrap();
    let empty_path = dir.join("empty.anvec");
    empty.save(&empty_path).unwrap();
    let empty = Collection::load(&empty_path, rescored(dims)).unwrap();
    assert!(empty.scale.get().is_none());
    empty.upsert(1, &data[..dims], label("a")).unwrap();
    assert!(empty.scale.get().is_some());
    // A version 2 file's i8 graph is on usearch's scale, not ours: rebuilt, not mixed with.
    let v3 = std::fs::read(&path).unwrap();
    std::fs::write(&path, with_version(&v3, 2)).unwrap();
    let err = Collection::load(&path, rescored(dims)).err().unwrap();
    assert!(
        err.to_string().contains("quantised by an earlier version"),
        "{err}"
    );
    std::fs::write(&path, with_version(&v3, 4)).unwrap();
    let err = Collection::load(&path, rescored(dims)).err().unwrap();
    assert!(
        err.to_string().contains("written by a newer agentnode"),
        "{err}"
    );
    let plain = Collection::new(Options {
        metric: Metric::Cos,
        ..opts(dims)
    })
    .unwrap();
    plain.upsert(1, &data[..dims], label("a")).unwrap();
    plain.save(&path).unwrap();
    assert!(matches!(
        Collection::load(&path, rescored(dims)),
        Err(Error::Corrupt { .. })
    ));
    // Other dtypes' version 2 files are what version 3 writes.
    let v3 = std::fs::read(&path).unwrap();
    std::fs::write(&path, with_version(&v3, 2)).unwrap();
    let cos = Options {
        metric: Metric::Cos,
        ..opts(dims)
    };
    assert_eq!(Collection::load(&path, cos).unwrap().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `file` (a collection file) with its version byte set to `version` and its checksum redone.
fn with_version(file: &[u8], version: u8) -> Vec<u8> {
    let mut body = file[..file.len() - 4].to_vec();
    body[7] = version;
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

#[test]
fn the_i8_scale_spans_eight_rms_or_the_first_vectors_peaks() {
    let dims = 384;
    let rms = 1.0 / 384f32.sqrt();
    // Components within a few RMS: the span is 8 RMS, and the RMS component gets 127/8 steps.
    let flat: Vec<f32> = (0..dims)
        .map(|i| if i % 2 == 0 { rms } else { -rms })
        .collect();
    let scale = i8_scale(std::iter::once(&flat[..]), dims);
    assert!((scale - 127.0 / (8.0 * rms)).abs() < 1e-3, "{scale}");
    let q = quantise(&flat, scale);
    assert_eq!((q[0], q[1]), (16, -16));
    // A shared large dimension (0.5 in every vector): 1.5x its size, so nothing saturates.
    let mut peaked = flat.clone();
    peaked[0] = 0.5;
    let unit = super::quantise::unit(&peaked, String::new).unwrap();
    let rows = [&peaked[..], &peaked[..], &flat[..]];
    let scale = i8_scale(rows.into_iter(), dims);
    assert!((scale - 127.0 / (1.5 * unit[0])).abs() < 1e-2, "{scale}");
    assert_eq!(quantise(&unit, scale)[0], 85);
    // The median peak: one odd vector out of three does not set the span.
    let rows = [&flat[..], &peaked[..], &flat[..]];
    assert!((i8_scale(rows.into_iter(), dims) - 127.0 / (8.0 * rms)).abs() < 1e-3);
    // Never coarser than usearch's cast; saturates rather than wraps.
    assert!((i8_scale(std::iter::once(&[1.0, 0.0][..]), 2) - 127.0).abs() < 1e-6);
    assert_eq!(quantise(&[0.6, -0.8], 127.0), vec![76, -102]);
    assert_eq!(quantise(&[2.0, -2.0], 127.0), vec![127, -127]);
}

#[test]
fn batch_search_keeps_query_order_across_threads() {
    let (n, dims) = (500, 8);
    let data = vectors(n, dims, 21);
    let c = filled(opts(dims), &data);
    // 203 queries on 3 threads: blocks of up to 16, the last one short.
    let queries = &data[..203 * dims];
    let one_by_one: Vec<Vec<Hit>> = queries
        .chunks_exact(dims)
        .map(|q| c.search(q, 3, &Filter::default()).unwrap())
        .collect();
    for threads in [1, 2, 3, 64] {
        assert_eq!(
            c.search_batch(queries, 3, &Filter::default(), threads)
                .unwrap(),
            one_by_one,
            "{threads} threads"
        );
    }
    let err = c
        .search_batch(&data[..40 * dims], 0, &Filter::default(), 3)
        .unwrap_err();
    assert!(
        matches!(err, Error::ZeroK),
        "a worker's error reaches the caller"
    );
}

#[test]
fn each_search_walks_with_the_collections_ef() {
    // Uniform 32-d points: hard enough that a walk keeping 10 misses neighbours one keeping
    // 300 finds. usearch's own ef is held at 1; the collection's must still reach every search.
    let (n, dims, k) = (4000, 32, 10);
    let data = vectors(n, dims, 3);
    let c = filled(opts(dims), &data);
    let everything = |_: u64| true;
    let recall = |ef: usize| {
        c.set_expansion_search(ef).unwrap();
        assert_eq!(c.expansion_search(), ef);
        let mut found = 0;
        for q in 0..50 {
            let query = vectors(1, dims, 500 + q);
            let truth = brute(Metric::L2, &data, dims, &query, k, everything);
            let hits = c.search(&query, k, &Filter::default()).unwrap();
            assert_eq!(hits.len(), k);
            found += hits.iter().filter(|h| truth.contains(&h.key)).count();
        }
        found
    };
    let (narrow, wide) = (recall(10), recall(300));
    assert!(wide >= 495, "ef 300 found {wide} of 500");
    assert!(narrow < wide, "ef 10 found {narrow}, ef 300 {wide}");
    assert!(matches!(c.set_expansion_search(0), Err(Error::ZeroK)));
}
