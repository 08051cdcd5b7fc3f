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
