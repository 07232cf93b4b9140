//! The reference cache's tests: temporal lookups, reloads and corrections.

use super::*;

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn merchant(valid_from: &str, fee_bps: i64) -> MerchantVersion {
    MerchantVersion {
        merchant_id: "m1".into(),
        valid_from: t(valid_from),
        name: "Shop".into(),
        settlement_currency: Currency::from_code("EUR").unwrap(),
        fee_bps: Decimal::new(fee_bps, 0),
        fee_fixed: Decimal::ZERO,
        status: MerchantStatus::Active,
        tolerance_abs: None,
        tolerance_rel: None,
        settlement_deadline: None,
        payment_deadline: None,
    }
}

#[test]
fn lookups_use_the_version_valid_at_the_event_time() {
    let s = Snapshot::new(
        vec![
            merchant("2026-03-01T00:00:00Z", 200),
            merchant("2026-01-01T00:00:00Z", 150),
        ],
        vec![],
        1,
    );
    assert!(s.merchant_at("m1", t("2025-12-31T23:59:59Z")).is_none());
    assert_eq!(
        s.merchant_at("m1", t("2026-01-01T00:00:00Z"))
            .unwrap()
            .fee_bps,
        Decimal::new(150, 0)
    );
    assert_eq!(
        s.merchant_at("m1", t("2026-02-28T23:59:59Z"))
            .unwrap()
            .fee_bps,
        Decimal::new(150, 0)
    );
    assert_eq!(
        s.merchant_at("m1", t("2026-03-01T00:00:00Z"))
            .unwrap()
            .fee_bps,
        Decimal::new(200, 0)
    );
    assert!(
        s.merchant_at("unknown", t("2026-03-01T00:00:00Z"))
            .is_none()
    );
}

#[test]
fn the_packed_snapshot_returns_every_version_whole_at_its_boundaries() {
    let eur = Currency::from_code("EUR").unwrap();
    let jpy = Currency::from_code("JPY").unwrap();
    let version = |id: &str, from: &str, name: &str, fee_bps: i64| MerchantVersion {
        merchant_id: id.into(),
        name: name.into(),
        ..merchant(from, fee_bps)
    };
    let with_overrides = MerchantVersion {
        tolerance_abs: Some(Decimal::new(50, 2)),
        tolerance_rel: Some(Decimal::new(5, 4)),
        settlement_deadline: Some(Duration::from_secs(96 * 3600)),
        payment_deadline: Some(Duration::from_secs(3600)),
        status: MerchantStatus::Suspended,
        ..version("m2", "2026-02-01T00:00:00Z", "Two", 100)
    };
    let wide_fee = MerchantVersion {
        // Too wide for the packed form: kept in the side table, exactly.
        fee_fixed: Decimal::new(123_456_789_012_345, 4),
        settlement_currency: jpy,
        ..version("m3", "2026-01-01T00:00:00Z", "Three", 0)
    };
    // Out of order, merchants interleaved, as rows come from a table.
    let versions = vec![
        version("m1", "2026-03-01T00:00:00Z", "One", 200),
        with_overrides.clone(),
        version("m1", "2026-01-01T00:00:00Z", "One", 150),
        wide_fee.clone(),
        version("m2", "2026-01-01T00:00:00Z", "Two", 90),
        version("m1", "2026-06-01T00:00:00Z", "One Ltd", 250),
        MerchantVersion {
            // Scale kept: 1.5000 stays 1.5000, not 1.5.
            fee_bps: Decimal::new(15_000, 4),
            ..version("m2", "2026-03-01T00:00:00Z", "Two", 0)
        },
    ];
    let s = Snapshot::new(versions.clone(), vec![], 7);

    for v in &versions {
        let found = s.merchant_at(&v.merchant_id, v.valid_from).unwrap();
        assert_eq!(found.to_version(), *v);
        assert_eq!(found.fee_bps.scale(), v.fee_bps.scale());
        assert_eq!(found.fee_fixed.scale(), v.fee_fixed.scale());
    }
    let second = chrono::Duration::seconds(1);
    let bps = |id: &str, at: DateTime<Utc>| s.merchant_at(id, at).map(|m| m.fee_bps);
    assert_eq!(bps("m1", t("2026-01-01T00:00:00Z") - second), None);
    assert_eq!(
        bps("m1", t("2026-03-01T00:00:00Z") - second),
        Some(Decimal::new(150, 0))
    );
    assert_eq!(
        bps("m1", t("2026-03-01T00:00:00Z")),
        Some(Decimal::new(200, 0))
    );
    assert_eq!(
        bps("m1", t("2030-01-01T00:00:00Z")),
        Some(Decimal::new(250, 0))
    );
    assert_eq!(
        s.merchant_at("m1", t("2030-01-01T00:00:00Z")).unwrap().name,
        "One Ltd"
    );
    assert_eq!(
        s.merchant_at("m1", t("2026-05-01T00:00:00Z")).unwrap().name,
        "One"
    );
    // The overrides belong to their version only.
    let m2 = |at: &str| s.merchant_at("m2", t(at)).unwrap();
    assert_eq!(m2("2026-01-31T23:59:59Z").tolerance_abs, None);
    assert_eq!(m2("2026-02-15T00:00:00Z").to_version(), with_overrides);
    assert_eq!(m2("2026-03-01T00:00:00Z").settlement_deadline, None);
    assert_eq!(m2("2026-03-01T00:00:00Z").status, MerchantStatus::Active);
    assert_eq!(
        s.merchant_at("m3", t("2027-01-01T00:00:00Z"))
            .unwrap()
            .to_version(),
        wide_fee
    );
    assert!(s.merchant_at("m4", t("2026-03-01T00:00:00Z")).is_none());
    assert!(s.merchant_at("", t("2026-03-01T00:00:00Z")).is_none());

    let stats = s.stats();
    assert_eq!((stats.merchants, stats.merchant_versions), (3, 7));
    // "One" is stored once for m1's first two versions, "Two" once for m2's three.
    assert_eq!(stats.names, 4);
    assert_eq!(stats.extras, 2);
    assert_eq!(s.generation, 7);
    assert_eq!(
        s.merchant_at("m3", t("2026-01-01T00:00:00Z"))
            .unwrap()
            .settlement_currency,
        jpy
    );
    assert_eq!(
        s.merchant_at("m1", t("2026-01-01T00:00:00Z"))
            .unwrap()
            .settlement_currency,
        eur
    );
}

#[test]
fn thousands_of_merchants_are_all_found_after_the_index_grows() {
    let mut builder = SnapshotBuilder::new();
    for v in 0..3 {
        for n in 0..5_000i64 {
            let mut m = merchant("2026-01-01T00:00:00Z", n);
            m.merchant_id = format!("merchant-{n:06}");
            m.valid_from += chrono::Duration::days(30 * v);
            m.fee_fixed = Decimal::new(v, 2);
            builder.push_merchant(m.view());
        }
    }
    let s = builder.build(1);
    assert_eq!(s.stats().merchants, 5_000);
    for n in 0..5_000i64 {
        let m = s
            .merchant_at(&format!("merchant-{n:06}"), t("2026-02-15T00:00:00Z"))
            .unwrap();
        assert_eq!(m.merchant_id, format!("merchant-{n:06}"));
        assert_eq!(
            (m.fee_bps, m.fee_fixed),
            (Decimal::new(n, 0), Decimal::new(1, 2))
        );
    }
    assert!(
        s.merchant_at("merchant-005000", t("2026-02-15T00:00:00Z"))
            .is_none()
    );
}

#[test]
fn rates_are_direct_inverse_or_one() {
    let usd = Currency::from_code("USD").unwrap();
    let eur = Currency::from_code("EUR").unwrap();
    let s = Snapshot::new(
        vec![],
        vec![FxRate {
            base: usd,
            quote: eur,
            valid_from: t("2026-01-01T00:00:00Z"),
            rate: Decimal::new(8, 1),
        }],
        1,
    );
    let at = t("2026-06-01T00:00:00Z");
    assert_eq!(s.rate_at(usd, eur, at), Some(Decimal::new(8, 1)));
    assert_eq!(s.rate_at(eur, usd, at), Some(Decimal::new(125, 2)));
    assert_eq!(s.rate_at(eur, eur, at), Some(Decimal::ONE));
    assert_eq!(s.rate_at(usd, eur, t("2025-06-01T00:00:00Z")), None);
    assert_eq!(
        s.rate_at(usd, Currency::from_code("GBP").unwrap(), at),
        None
    );
}
