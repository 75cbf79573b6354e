//! One set of behaviour stories, run against every backend: SQLite always (a fresh
//! file database per test), PostgreSQL when `HAVEN_TEST_POSTGRES_URL` names an admin
//! URL (a fresh database per test, dropped afterwards, also when the story fails).
//! The audit stories also reach into the database directly, as an attacker or an
//! administrator with database access would.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use haven_audit::canonical::canonical_json;
use haven_audit::{link_hash, BreakKind, ChainBreak, StoredLink, GENESIS};
use haven_model::clock::{format_instant, Clock, ManualClock};
use haven_model::search_index::{date_range, decimal_range, normalize_string};
use haven_store::{
    Access, AccessRule, AuditQuery, AuditRecord, AuditWriter, Backend, BothAccess, Change,
    Comparator, ContentFilter, Criterion, HistoryQuery, IndexKind, InstantBound, Prefix, Range,
    SearchQuery, SortBy, SortKey, Store, StoreError, StringMatch, TokenValue, TypeAccess, UriMatch,
};
use serde_json::{json, Value};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const START: OffsetDateTime = datetime!(2026-03-01 12:00:00 UTC);

/// What every story gets: a store on an empty database and the clock it uses.
struct World {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    /// The store's database URL, for direct access.
    url: String,
    /// PostgreSQL only: the admin URL the database was created through.
    admin_url: Option<String>,
}

impl World {
    fn tick(&self) {
        self.clock.advance(Duration::seconds(1));
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }
}

async fn on_sqlite<F, Fut>(story: F)
where
    F: FnOnce(World) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite:{}", dir.path().join("haven.db").display());
    let clock = Arc::new(ManualClock::new(START));
    let store = haven_store::connect(&url, clock.clone())
        .await
        .expect("sqlite store");
    assert_eq!(store.backend(), Backend::Sqlite);
    story(World {
        store,
        clock,
        url,
        admin_url: None,
    })
    .await;
}

async fn on_postgres<F, Fut>(story: F)
where
    F: FnOnce(World) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(admin_url) = std::env::var("HAVEN_TEST_POSTGRES_URL") else {
        println!("not run: HAVEN_TEST_POSTGRES_URL is not set");
        return;
    };
    let name = format!("haven_test_{}", uuid::Uuid::new_v4().simple());
    admin(&admin_url, &format!("CREATE DATABASE {name}")).await;
    let url = database_url(&admin_url, &name);
    let clock = Arc::new(ManualClock::new(START));
    let story_admin_url = admin_url.clone();
    // The story runs as its own task so that a failing assertion still lets the
    // database be dropped before the failure is passed on.
    let outcome = tokio::spawn(async move {
        let store = haven_store::connect(&url, clock.clone())
            .await
            .expect("postgres store");
        assert_eq!(store.backend(), Backend::Postgres);
        story(World {
            store,
            clock,
            url,
            admin_url: Some(story_admin_url),
        })
        .await;
    })
    .await;
    admin(
        &admin_url,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

/// Runs one statement on the admin database through a store-independent client.
async fn admin(admin_url: &str, statement: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("admin connection");
    sqlx::raw_sql(statement)
        .execute(&mut conn)
        .await
        .expect(statement);
    let _ = conn.close().await;
}

/// The admin URL with its database name replaced.
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Declares each story once per backend, as `sqlite::story` and `postgres::story`.
macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $story() {
                    super::on_sqlite(super::$story).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $story() {
                    super::on_postgres(super::$story).await;
                }
            )*
        }
    };
}

/// PostgreSQL only: a database server that restarted (or an administrator)
/// ends the pool's idle connections; the next request must not fail on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_and_writes_again_after_the_server_ends_its_idle_connections() {
    on_postgres(reads_and_writes_after_idle_connections_were_ended).await;
}

async fn reads_and_writes_after_idle_connections_were_ended(world: World) {
    create(&world, "Patient", "before", patient("Before")).await;
    assert!(world
        .store
        .read("Patient", "before")
        .await
        .unwrap()
        .is_some());
    let mut direct = Direct::open(&world).await;
    direct
        .run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
    // Past the idle time after which a pooled connection is checked first.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let read = world.store.read("Patient", "before").await.unwrap();
    assert_eq!(read.unwrap().id, "before");
    create(&world, "Patient", "after", patient("After")).await;
    assert!(world
        .store
        .read("Patient", "after")
        .await
        .unwrap()
        .is_some());
}

stories!(
    a_created_resource_can_be_read_and_vread,
    the_store_stamps_id_version_and_last_updated_and_keeps_client_meta,
    creating_an_existing_id_fails_with_already_exists,
    each_update_adds_a_version_and_old_versions_stay_readable,
    updating_a_missing_resource_creates_version_one,
    deleting_writes_a_bodyless_version_and_update_recreates_after_it,
    deleting_nothing_returns_none,
    an_expected_version_that_is_not_current_is_a_version_conflict,
    two_racing_updates_of_one_version_have_exactly_one_winner,
    a_transaction_dropped_without_commit_leaves_nothing,
    a_large_transaction_commits_whole_or_not_at_all_beside_small_ones,
    search_filters_by_type_id_and_last_updated,
    search_pages_with_count_offset_total_and_more,
    search_sorts_by_last_updated_both_ways,
    search_by_identifier_follows_token_semantics,
    search_inside_a_transaction_sees_its_own_writes,
    deleted_and_replaced_identifiers_no_longer_match,
    history_of_an_instance_a_type_and_the_system_is_newest_first,
    history_honours_since_and_at,
    history_pages_through_next_without_gaps_or_repeats,
    count_by_type_counts_live_resources,
    a_content_filter_applies_before_paging_and_counting,
    a_content_filter_hides_versions_from_history,
    auth_records_insert_once_and_expire,
    auth_records_read_together_answer_in_the_order_asked,
    staged_auth_record_inserts_race_like_inserts_and_commit,
    auth_records_replace_only_what_they_expect,
    auth_records_written_at_once_each_get_their_own_answer,
    appended_audit_events_get_ids_meta_and_consecutive_positions_after_genesis,
    audit_events_appended_in_a_transaction_commit_with_its_writes_or_not_at_all,
    audit_events_appended_in_a_transaction_outlast_a_refused_create_and_precede_its_reads,
    concurrent_appends_by_every_path_leave_one_unbroken_chain,
    the_audit_writer_answers_every_waiter_and_fails_them_all_when_the_database_refuses,
    an_unwritable_audit_table_fails_every_append_and_the_transaction_around_it,
    the_database_refuses_to_change_or_remove_audit_records,
    verify_names_a_changed_audit_record,
    verify_names_the_record_after_a_removed_one,
    verify_names_where_a_forged_record_was_slipped_in,
    audit_search_finds_events_by_every_parameter,
    audit_search_pages_counts_and_applies_a_content_filter_first,
    an_audit_event_is_read_by_id,
    a_created_patient_has_folded_string_rows,
    an_observation_has_token_reference_date_and_quantity_rows,
    an_update_replaces_the_index_rows_and_a_delete_removes_them,
    a_dropped_transaction_leaves_no_index_rows,
    connect_backfills_an_index_written_before_it_existed,
    two_stores_connecting_at_once_backfill_once,
    string_search_folds_case_and_accents_exact_is_as_written_and_wildcards_are_literal,
    token_search_matches_every_system_and_code_form_negation_text_and_identifier_type,
    reference_search_matches_type_and_id_id_alone_absolute_urls_and_canonical_versions,
    date_search_honours_every_prefix_on_days_seconds_zones_and_periods,
    number_and_quantity_search_compare_midpoints_with_precision_units_and_rounding,
    uri_search_matches_exactly_below_and_above,
    missing_finds_resources_with_and_without_a_value,
    a_composite_matches_parts_of_one_combination_in_order,
    the_patient_compartment_holds_the_patient_and_what_refers_to_it,
    chains_and_has_follow_references_and_the_access_applies_inside_them,
    access_rules_confine_counts_pages_system_searches_and_combine,
    sorting_is_total_the_same_on_every_backend_and_search_keys_pages_alike,
    a_keys_criterion_returns_exactly_the_named_resources,
    criteria_nested_too_deeply_are_too_complex_and_composites_of_non_values_unsupported,
    a_chain_to_several_target_types_stays_on_its_own_parameter_and_resource,
    token_outside_and_compartment_outside_find_labels_and_patients_beyond_a_list,
);

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}]})
}

fn with_identifiers(mut resource: Value, identifiers: Value) -> Value {
    resource["identifier"] = identifiers;
    resource
}

async fn create(world: &World, resource_type: &str, id: &str, resource: Value) {
    let mut tx = world.store.begin().await.unwrap();
    tx.create(resource_type, id, resource).await.unwrap();
    tx.commit().await.unwrap();
}

async fn update(world: &World, resource_type: &str, id: &str, resource: Value) -> (i64, bool) {
    let mut tx = world.store.begin().await.unwrap();
    let (version, created) = tx.update(resource_type, id, resource, None).await.unwrap();
    tx.commit().await.unwrap();
    (version.version, created)
}

async fn delete(world: &World, resource_type: &str, id: &str) -> Option<i64> {
    let mut tx = world.store.begin().await.unwrap();
    let deleted = tx.delete(resource_type, id, None).await.unwrap();
    tx.commit().await.unwrap();
    deleted.map(|v| v.version)
}

fn ids(page: &haven_store::SearchPage) -> Vec<String> {
    page.resources.iter().map(|r| r.id.clone()).collect()
}

fn search(resource_type: Option<&str>) -> SearchQuery {
    SearchQuery {
        types: resource_type.map(str::to_owned).into_iter().collect(),
        count: 100,
        ..SearchQuery::default()
    }
}

/// A token search value as `(system, code)`.
type Token<'a> = (Option<&'a str>, Option<&'a str>);

fn identifier(values: &[Token<'_>]) -> Criterion {
    Criterion::Any(
        values
            .iter()
            .map(|(system, code)| Criterion::Token {
                param: "identifier".into(),
                system: system.map(str::to_owned),
                code: code.map(str::to_owned),
            })
            .collect(),
    )
}

fn history(resource_type: Option<&str>, id: Option<&str>) -> HistoryQuery {
    HistoryQuery {
        resource_type: resource_type.map(str::to_owned),
        id: id.map(str::to_owned),
        count: 100,
        ..HistoryQuery::default()
    }
}

fn versions(page: &haven_store::HistoryPage) -> Vec<(String, i64)> {
    page.versions
        .iter()
        .map(|v| (v.id.clone(), v.version))
        .collect()
}

async fn a_created_resource_can_be_read_and_vread(world: World) {
    let mut tx = world.store.begin().await.unwrap();
    let created = tx
        .create("Patient", "p1", patient("Chalmers"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(created.version, 1);
    assert_eq!(created.change, Change::Create);

    let read = world.store.read("Patient", "p1").await.unwrap().unwrap();
    assert_eq!(read, created);
    let vread = world
        .store
        .vread("Patient", "p1", 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(vread, created);
    assert_eq!(world.store.vread("Patient", "p1", 2).await.unwrap(), None);
    assert_eq!(world.store.read("Patient", "p2").await.unwrap(), None);
    assert_eq!(world.store.read("Observation", "p1").await.unwrap(), None);
}

async fn the_store_stamps_id_version_and_last_updated_and_keeps_client_meta(world: World) {
    let sent = json!({
        "resourceType": "Patient",
        "id": "chosen-by-client",
        "meta": {"versionId": "42", "lastUpdated": "2001-01-01T00:00:00Z",
                 "profile": ["http://example.org/p"], "tag": [{"code": "t"}],
                 "security": [{"code": "s"}], "source": "http://example.org/src"},
        "active": true
    });
    let mut tx = world.store.begin().await.unwrap();
    let created = tx.create("Patient", "p1", sent).await.unwrap();
    tx.commit().await.unwrap();
    let expected = json!({
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"versionId": "1", "lastUpdated": format_instant(START),
                 "profile": ["http://example.org/p"], "tag": [{"code": "t"}],
                 "security": [{"code": "s"}], "source": "http://example.org/src"},
        "active": true
    });
    assert_eq!(created.resource.as_ref(), Some(&expected));
    assert_eq!(created.last_updated, START);
    let read = world.store.read("Patient", "p1").await.unwrap().unwrap();
    assert_eq!(read.resource, Some(expected));
    assert_eq!(read.last_updated, START);

    world.tick();
    let (version, _) = update(&world, "Patient", "p1", patient("Next")).await;
    let read = world.store.read("Patient", "p1").await.unwrap().unwrap();
    let body = read.resource.unwrap();
    assert_eq!(version, 2);
    assert_eq!(body["meta"]["versionId"], "2");
    assert_eq!(body["meta"]["lastUpdated"], format_instant(world.now()));
    assert_eq!(read.last_updated, world.now());
}

async fn creating_an_existing_id_fails_with_already_exists(world: World) {
    create(&world, "Patient", "p1", patient("A")).await;
    let mut tx = world.store.begin().await.unwrap();
    let err = tx.create("Patient", "p1", patient("B")).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    // The failed create leaves the transaction usable.
    tx.create("Patient", "p2", patient("C")).await.unwrap();
    tx.commit().await.unwrap();
    // And wrote nothing: neither a version nor index rows.
    let kept = world.store.read("Patient", "p1").await.unwrap().unwrap();
    assert_eq!(kept.version, 1);
    assert_eq!(kept.resource.unwrap()["name"][0]["family"], "A");
    finds(
        &world,
        "Patient",
        string("family", "B", StringMatch::Exact),
        &[],
    )
    .await;
    finds(
        &world,
        "Patient",
        string("family", "A", StringMatch::Exact),
        &["p1"],
    )
    .await;

    // Even a deleted id stays taken.
    delete(&world, "Patient", "p1").await.unwrap();
    let mut tx = world.store.begin().await.unwrap();
    let err = tx.create("Patient", "p1", patient("D")).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    // The same id in another type is free.
    tx.create("Observation", "p1", json!({"resourceType": "Observation"}))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn each_update_adds_a_version_and_old_versions_stay_readable(world: World) {
    create(&world, "Patient", "p1", patient("V1")).await;
    for expected in 2..=4 {
        world.tick();
        let (version, created) =
            update(&world, "Patient", "p1", patient(&format!("V{expected}"))).await;
        assert_eq!((version, created), (expected, false));
    }
    let current = world.store.read("Patient", "p1").await.unwrap().unwrap();
    assert_eq!(current.version, 4);
    assert_eq!(current.change, Change::Update);
    assert_eq!(current.resource.unwrap()["name"][0]["family"], "V4");
    for version in 1..=4 {
        let old = world
            .store
            .vread("Patient", "p1", version)
            .await
            .unwrap()
            .unwrap();
        let body = old.resource.unwrap();
        assert_eq!(body["name"][0]["family"], format!("V{version}"));
        assert_eq!(body["meta"]["versionId"], version.to_string());
        assert_eq!(old.last_updated, START + Duration::seconds(version - 1));
    }
}

async fn updating_a_missing_resource_creates_version_one(world: World) {
    let (version, created) = update(&world, "Patient", "new", patient("N")).await;
    assert_eq!((version, created), (1, true));
    let read = world.store.read("Patient", "new").await.unwrap().unwrap();
    assert_eq!(read.version, 1);
    assert_eq!(read.resource.unwrap()["meta"]["versionId"], "1");
    let (version, created) = update(&world, "Patient", "new", patient("M")).await;
    assert_eq!((version, created), (2, false));
}

async fn deleting_writes_a_bodyless_version_and_update_recreates_after_it(world: World) {
    create(&world, "Patient", "p1", patient("A")).await;
    world.tick();
    assert_eq!(delete(&world, "Patient", "p1").await, Some(2));
    let current = world.store.read("Patient", "p1").await.unwrap().unwrap();
    assert!(current.is_deleted());
    assert_eq!(
        (current.version, current.change, current.last_updated),
        (2, Change::Delete, world.now())
    );
    assert!(world
        .store
        .vread("Patient", "p1", 2)
        .await
        .unwrap()
        .unwrap()
        .is_deleted());
    assert!(world
        .store
        .vread("Patient", "p1", 1)
        .await
        .unwrap()
        .unwrap()
        .resource
        .is_some());
    assert!(ids(&world.store.search(&search(Some("Patient"))).await.unwrap()).is_empty());

    world.tick();
    let (version, created) = update(&world, "Patient", "p1", patient("B")).await;
    assert_eq!((version, created), (3, true));
    let current = world.store.read("Patient", "p1").await.unwrap().unwrap();
    assert_eq!(current.resource.unwrap()["meta"]["versionId"], "3");
    assert_eq!(
        ids(&world.store.search(&search(Some("Patient"))).await.unwrap()),
        ["p1"]
    );
}

async fn deleting_nothing_returns_none(world: World) {
    assert_eq!(delete(&world, "Patient", "never").await, None);
    create(&world, "Patient", "p1", patient("A")).await;
    assert_eq!(delete(&world, "Patient", "p1").await, Some(2));
    assert_eq!(delete(&world, "Patient", "p1").await, None);
    assert_eq!(
        world
            .store
            .read("Patient", "p1")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

async fn an_expected_version_that_is_not_current_is_a_version_conflict(world: World) {
    create(&world, "Patient", "p1", patient("A")).await;
    update(&world, "Patient", "p1", patient("B")).await;

    let mut tx = world.store.begin().await.unwrap();
    let err = tx
        .update("Patient", "p1", patient("C"), Some(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::VersionConflict {
                expected: 1,
                current: Some(2)
            }
        ),
        "{err:?}"
    );
    let err = tx.delete("Patient", "p1", Some(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err:?}");
    let err = tx
        .update("Patient", "missing", patient("D"), Some(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::VersionConflict {
                expected: 1,
                current: None
            }
        ),
        "{err:?}"
    );
    let (version, created) = tx
        .update("Patient", "p1", patient("E"), Some(2))
        .await
        .unwrap();
    assert_eq!((version.version, created), (3, false));
    let deleted = tx.delete("Patient", "p1", Some(3)).await.unwrap().unwrap();
    assert_eq!(deleted.version, 4);
    tx.commit().await.unwrap();
}

async fn two_racing_updates_of_one_version_have_exactly_one_winner(world: World) {
    for round in 0..8 {
        let id = format!("race{round}");
        create(&world, "Patient", &id, patient("Start")).await;
        let mut racers = Vec::new();
        for racer in 0..2 {
            let store = world.store.clone();
            let id = id.clone();
            racers.push(tokio::spawn(async move {
                let mut tx = store.begin().await?;
                let outcome = tx
                    .update("Patient", &id, patient(&format!("R{racer}")), Some(1))
                    .await;
                // Hold the transaction open a little so the other racer really overlaps.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                match outcome {
                    Ok(_) => tx.commit().await,
                    Err(e) => Err(e),
                }
            }));
        }
        let mut wins = 0;
        let mut conflicts = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Ok(()) => wins += 1,
                Err(StoreError::VersionConflict {
                    expected: 1,
                    current: Some(2),
                }) => conflicts += 1,
                Err(other) => panic!("unexpected outcome: {other:?}"),
            }
        }
        assert_eq!((wins, conflicts), (1, 1), "round {round}");
        let current = world.store.read("Patient", &id).await.unwrap().unwrap();
        assert_eq!(current.version, 2);
        assert_eq!(world.store.vread("Patient", &id, 3).await.unwrap(), None);
    }
}

async fn a_transaction_dropped_without_commit_leaves_nothing(world: World) {
    create(&world, "Patient", "kept", patient("K")).await;
    {
        let mut tx = world.store.begin().await.unwrap();
        tx.create(
            "Patient",
            "dropped",
            with_identifiers(patient("D"), json!([{"system": "s", "value": "v"}])),
        )
        .await
        .unwrap();
        tx.update("Patient", "kept", patient("Changed"), None)
            .await
            .unwrap();
        tx.delete("Patient", "kept", None).await.unwrap();
    }
    assert_eq!(world.store.read("Patient", "dropped").await.unwrap(), None);
    let kept = world.store.read("Patient", "kept").await.unwrap().unwrap();
    assert_eq!(kept.version, 1);
    let mut query = search(Some("Patient"));
    query.criterion = identifier(&[(Some("s"), Some("v"))]);
    assert!(ids(&world.store.search(&query).await.unwrap()).is_empty());
    let all = world.store.history(&history(None, None)).await.unwrap();
    assert_eq!(versions(&all), [("kept".to_owned(), 1)]);

    // The store stays usable after the rollback.
    create(&world, "Patient", "dropped", patient("Again")).await;
    assert_eq!(
        world
            .store
            .read("Patient", "dropped")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
}

async fn a_large_transaction_commits_whole_or_not_at_all_beside_small_ones(world: World) {
    let store = world.store.clone();
    let large = |prefix: &'static str, keep: bool| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tx = store.begin_large().await.unwrap();
            for n in 0..50 {
                tx.create("Patient", &format!("{prefix}-{n}"), patient(prefix))
                    .await
                    .unwrap();
            }
            if keep {
                tx.commit().await.unwrap();
            }
        })
    };
    let small = |n: usize| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            tx.create("Patient", &format!("small-{n}"), patient("Small"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        })
    };
    let mut tasks = vec![large("kept", true), large("dropped", false)];
    tasks.extend((0..8).map(small));
    for task in tasks {
        task.await.unwrap();
    }
    for n in 0..50 {
        assert!(store
            .read("Patient", &format!("kept-{n}"))
            .await
            .unwrap()
            .is_some());
        assert_eq!(
            store
                .read("Patient", &format!("dropped-{n}"))
                .await
                .unwrap(),
            None
        );
    }
    for n in 0..8 {
        assert!(store
            .read("Patient", &format!("small-{n}"))
            .await
            .unwrap()
            .is_some());
    }
}

async fn search_filters_by_type_id_and_last_updated(world: World) {
    for (n, id) in ["a", "b", "c"].iter().enumerate() {
        if n > 0 {
            world.tick();
        }
        create(&world, "Patient", id, patient(id)).await;
    }
    create(
        &world,
        "Observation",
        "a",
        json!({"resourceType": "Observation"}),
    )
    .await;
    world.tick();
    create(&world, "Patient", "gone", patient("gone")).await;
    delete(&world, "Patient", "gone").await;

    let all_patients = world.store.search(&search(Some("Patient"))).await.unwrap();
    assert_eq!(ids(&all_patients), ["a", "b", "c"]);
    assert!(all_patients.resources.iter().all(|r| r.resource.is_some()));
    let everything = world.store.search(&search(None)).await.unwrap();
    assert_eq!(everything.resources.len(), 4);

    let mut by_id = search(Some("Patient"));
    by_id.criterion = Criterion::Id(vec!["c".into(), "a".into(), "zzz".into(), "gone".into()]);
    assert_eq!(ids(&world.store.search(&by_id).await.unwrap()), ["a", "c"]);

    // `_lastUpdated` at a precision of seconds: the second from START + 1s.
    let second = START + Duration::seconds(1);
    let within = |prefix| Range {
        prefix,
        low: second,
        high: second + Duration::seconds(1),
        value: second,
    };
    let cases = [
        (Prefix::Lt, vec!["a"]),
        (Prefix::Le, vec!["a", "b"]),
        (Prefix::Gt, vec!["c"]),
        (Prefix::Ge, vec!["b", "c"]),
        (Prefix::Eq, vec!["b"]),
        (Prefix::Ne, vec!["a", "c"]),
    ];
    for (prefix, expected) in cases {
        let mut query = search(Some("Patient"));
        query.criterion = Criterion::LastUpdated(within(prefix));
        assert_eq!(
            ids(&world.store.search(&query).await.unwrap()),
            expected,
            "{prefix:?}"
        );
    }
    let mut range = search(Some("Patient"));
    range.criterion = Criterion::All(vec![
        Criterion::LastUpdated(Range {
            prefix: Prefix::Ge,
            low: START,
            high: START,
            value: START,
        }),
        Criterion::LastUpdated(Range {
            prefix: Prefix::Lt,
            low: START + Duration::seconds(2),
            high: START + Duration::seconds(2),
            value: START + Duration::seconds(2),
        }),
        Criterion::Id(vec!["b".into(), "c".into()]),
    ]);
    assert_eq!(ids(&world.store.search(&range).await.unwrap()), ["b"]);
}

async fn search_pages_with_count_offset_total_and_more(world: World) {
    for n in 0..7 {
        world.tick();
        create(&world, "Patient", &format!("p{n}"), patient("P")).await;
    }
    let mut query = search(Some("Patient"));
    query.count = 3;
    query.total = true;
    let mut seen = Vec::new();
    for page_number in 0..3 {
        query.offset = page_number * 3;
        let page = world.store.search(&query).await.unwrap();
        assert_eq!(page.total, Some(7));
        assert_eq!(page.more, page_number < 2, "page {page_number}");
        seen.extend(ids(&page));
    }
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);

    query.count = 0;
    query.offset = 0;
    let counted = world.store.search(&query).await.unwrap();
    assert!(counted.resources.is_empty());
    assert_eq!(counted.total, Some(7));

    query.count = 10;
    query.total = false;
    let page = world.store.search(&query).await.unwrap();
    assert_eq!(
        (page.total, page.more, page.resources.len()),
        (None, false, 7)
    );
}

async fn search_sorts_by_last_updated_both_ways(world: World) {
    create(&world, "Patient", "b", patient("b")).await;
    world.tick();
    create(&world, "Patient", "a", patient("a")).await;
    world.tick();
    create(&world, "Patient", "c", patient("c")).await;
    world.tick();
    update(&world, "Patient", "b", patient("b2")).await;
    let mut query = search(Some("Patient"));
    assert_eq!(
        ids(&world.store.search(&query).await.unwrap()),
        ["a", "c", "b"]
    );
    query.sort = vec![SortKey {
        by: SortBy::LastUpdated,
        descending: true,
    }];
    assert_eq!(
        ids(&world.store.search(&query).await.unwrap()),
        ["b", "c", "a"]
    );
}

async fn search_by_identifier_follows_token_semantics(world: World) {
    create(
        &world,
        "Patient",
        "both",
        with_identifiers(
            patient("Both"),
            json!([{"system": "urn:mrn", "value": "100"}, {"system": "urn:ssn", "value": "200"}]),
        ),
    )
    .await;
    create(
        &world,
        "Patient",
        "nosystem",
        with_identifiers(patient("NoSystem"), json!([{"value": "100"}])),
    )
    .await;
    create(
        &world,
        "Patient",
        "single",
        with_identifiers(
            patient("Single"),
            json!({"system": "urn:mrn", "value": "300"}),
        ),
    )
    .await;
    create(
        &world,
        "Organization",
        "org",
        json!({"resourceType": "Organization", "identifier": [{"system": "urn:mrn", "value": "100"}]}),
    )
    .await;

    let cases: Vec<(Vec<Token>, Vec<&str>)> = vec![
        (vec![(Some("urn:mrn"), Some("100"))], vec!["both"]),
        (vec![(None, Some("100"))], vec!["both", "nosystem"]),
        (vec![(Some(""), Some("100"))], vec!["nosystem"]),
        (vec![(Some("urn:mrn"), None)], vec!["both", "single"]),
        (vec![(Some("urn:ssn"), Some("100"))], vec![]),
        (
            vec![(Some("urn:ssn"), Some("200")), (None, Some("300"))],
            vec!["both", "single"],
        ),
    ];
    for (values, expected) in cases {
        let mut query = search(Some("Patient"));
        query.criterion = identifier(&values);
        let mut found = ids(&world.store.search(&query).await.unwrap());
        found.sort();
        assert_eq!(found, expected, "{values:?}");
    }

    // Two filters must both hold.
    let mut query = search(Some("Patient"));
    query.criterion = Criterion::All(vec![
        identifier(&[(Some("urn:mrn"), Some("100"))]),
        identifier(&[(Some("urn:ssn"), Some("200"))]),
    ]);
    assert_eq!(ids(&world.store.search(&query).await.unwrap()), ["both"]);

    // Without a type, every type is searched.
    let mut query = search(None);
    query.criterion = identifier(&[(Some("urn:mrn"), Some("100"))]);
    let mut found = ids(&world.store.search(&query).await.unwrap());
    found.sort();
    assert_eq!(found, ["both", "org"]);

    let mut unknown = search(Some("Patient"));
    // A criterion the store cannot evaluate is refused, never ignored.
    unknown.criterion = Criterion::Composite {
        param: "code-value".into(),
        parts: vec![Criterion::Id(vec!["x".into()])],
    };
    assert!(matches!(
        world.store.search(&unknown).await,
        Err(StoreError::Unsupported(_))
    ));
}

async fn search_inside_a_transaction_sees_its_own_writes(world: World) {
    let mut query = search(Some("Patient"));
    query.criterion = identifier(&[(Some("urn:mrn"), Some("7"))]);
    query.total = true;

    let mut tx = world.store.begin().await.unwrap();
    assert!(tx.search(&query).await.unwrap().resources.is_empty());
    tx.create(
        "Patient",
        "p1",
        with_identifiers(patient("A"), json!([{"system": "urn:mrn", "value": "7"}])),
    )
    .await
    .unwrap();
    let page = tx.search(&query).await.unwrap();
    assert_eq!((ids(&page), page.total), (vec!["p1".to_owned()], Some(1)));
    // Others do not see it before the commit.
    assert!(world
        .store
        .search(&query)
        .await
        .unwrap()
        .resources
        .is_empty());
    tx.commit().await.unwrap();
    assert_eq!(ids(&world.store.search(&query).await.unwrap()), ["p1"]);
}

async fn deleted_and_replaced_identifiers_no_longer_match(world: World) {
    create(
        &world,
        "Patient",
        "p1",
        with_identifiers(patient("A"), json!([{"system": "s", "value": "old"}])),
    )
    .await;
    create(
        &world,
        "Patient",
        "p2",
        with_identifiers(patient("B"), json!([{"system": "s", "value": "two"}])),
    )
    .await;
    update(
        &world,
        "Patient",
        "p1",
        with_identifiers(patient("A"), json!([{"system": "s", "value": "new"}])),
    )
    .await;
    delete(&world, "Patient", "p2").await;
    let find = |value: &'static str| {
        let mut query = search(Some("Patient"));
        query.criterion = identifier(&[(Some("s"), Some(value))]);
        query
    };
    assert!(ids(&world.store.search(&find("old")).await.unwrap()).is_empty());
    assert_eq!(
        ids(&world.store.search(&find("new")).await.unwrap()),
        ["p1"]
    );
    assert!(ids(&world.store.search(&find("two")).await.unwrap()).is_empty());
    update(
        &world,
        "Patient",
        "p2",
        with_identifiers(patient("B"), json!([{"system": "s", "value": "two"}])),
    )
    .await;
    assert_eq!(
        ids(&world.store.search(&find("two")).await.unwrap()),
        ["p2"]
    );
}

async fn history_of_an_instance_a_type_and_the_system_is_newest_first(world: World) {
    create(&world, "Patient", "p1", patient("A")).await;
    world.tick();
    create(
        &world,
        "Observation",
        "o1",
        json!({"resourceType": "Observation"}),
    )
    .await;
    world.tick();
    update(&world, "Patient", "p1", patient("B")).await;
    world.tick();
    create(&world, "Patient", "p2", patient("C")).await;
    world.tick();
    delete(&world, "Patient", "p1").await;

    let instance = world
        .store
        .history(&HistoryQuery {
            total: true,
            ..history(Some("Patient"), Some("p1"))
        })
        .await
        .unwrap();
    assert_eq!(
        versions(&instance),
        [("p1".into(), 3), ("p1".into(), 2), ("p1".into(), 1)]
    );
    assert_eq!(instance.total, Some(3));
    assert_eq!(instance.next, None);
    let changes: Vec<_> = instance.versions.iter().map(|v| v.change).collect();
    assert_eq!(changes, [Change::Delete, Change::Update, Change::Create]);
    assert!(instance.versions[0].is_deleted());

    let of_type = world
        .store
        .history(&history(Some("Patient"), None))
        .await
        .unwrap();
    assert_eq!(
        versions(&of_type),
        [
            ("p1".into(), 3),
            ("p2".into(), 1),
            ("p1".into(), 2),
            ("p1".into(), 1)
        ]
    );
    let system = world.store.history(&history(None, None)).await.unwrap();
    assert_eq!(
        versions(&system),
        [
            ("p1".into(), 3),
            ("p2".into(), 1),
            ("p1".into(), 2),
            ("o1".into(), 1),
            ("p1".into(), 1)
        ]
    );
    let missing = world
        .store
        .history(&history(Some("Patient"), Some("nope")))
        .await
        .unwrap();
    assert!(missing.versions.is_empty());
}

async fn history_honours_since_and_at(world: World) {
    // t0: p1 v1; t1: p2 v1; t2: p1 v2; t3: p2 deleted (v2).
    create(&world, "Patient", "p1", patient("A")).await;
    world.tick();
    create(&world, "Patient", "p2", patient("B")).await;
    world.tick();
    update(&world, "Patient", "p1", patient("C")).await;
    world.tick();
    delete(&world, "Patient", "p2").await;
    let t = |n: i64| START + Duration::seconds(n);

    let since = world
        .store
        .history(&HistoryQuery {
            since: Some(t(1)),
            total: true,
            ..history(Some("Patient"), None)
        })
        .await
        .unwrap();
    assert_eq!(
        versions(&since),
        [("p2".into(), 2), ("p1".into(), 2), ("p2".into(), 1)]
    );
    assert_eq!(since.total, Some(3));
    let since_instance = world
        .store
        .history(&HistoryQuery {
            since: Some(t(1)),
            ..history(Some("Patient"), Some("p1"))
        })
        .await
        .unwrap();
    assert_eq!(versions(&since_instance), [("p1".into(), 2)]);

    let at = |n: i64| HistoryQuery {
        at: Some(t(n)),
        ..history(None, None)
    };
    let at_1 = world.store.history(&at(1)).await.unwrap();
    assert_eq!(versions(&at_1), [("p2".into(), 1), ("p1".into(), 1)]);
    let between = world
        .store
        .history(&HistoryQuery {
            at: Some(t(2) - Duration::milliseconds(500)),
            ..history(None, None)
        })
        .await
        .unwrap();
    assert_eq!(versions(&between), [("p2".into(), 1), ("p1".into(), 1)]);
    let period = world
        .store
        .history(&HistoryQuery {
            at: Some(t(1)),
            at_until: Some(t(2) + Duration::milliseconds(500)),
            ..history(None, None)
        })
        .await
        .unwrap();
    assert_eq!(
        versions(&period),
        [("p1".into(), 2), ("p2".into(), 1), ("p1".into(), 1)]
    );
    let at_3 = world.store.history(&at(3)).await.unwrap();
    assert_eq!(versions(&at_3), [("p2".into(), 2), ("p1".into(), 2)]);
    let before_anything = world
        .store
        .history(&HistoryQuery {
            at: Some(t(-1)),
            ..history(None, None)
        })
        .await
        .unwrap();
    assert!(before_anything.versions.is_empty());
}

async fn history_pages_through_next_without_gaps_or_repeats(world: World) {
    for n in 0..5 {
        world.tick();
        create(&world, "Patient", &format!("p{n}"), patient("P")).await;
        world.tick();
        update(&world, "Patient", &format!("p{n}"), patient("Q")).await;
    }
    let mut query = HistoryQuery {
        count: 4,
        total: true,
        ..history(Some("Patient"), None)
    };
    let first = world.store.history(&query).await.unwrap();
    assert_eq!(first.total, Some(10));
    assert_eq!(first.versions.len(), 4);
    let mut seen = versions(&first);
    let mut next = first.next;
    // New writes after the first page must not shift the following pages.
    world.tick();
    create(&world, "Patient", "late", patient("L")).await;
    let mut pages = 1;
    while let Some(before) = next {
        query.before = Some(before);
        let page = world.store.history(&query).await.unwrap();
        assert_eq!(page.total, Some(11));
        seen.extend(versions(&page));
        next = page.next;
        pages += 1;
        assert!(pages <= 3, "too many pages");
    }
    assert_eq!(pages, 3);
    let mut expected = Vec::new();
    for n in (0..5).rev() {
        expected.push((format!("p{n}"), 2));
        expected.push((format!("p{n}"), 1));
    }
    assert_eq!(seen, expected);
}

async fn count_by_type_counts_live_resources(world: World) {
    assert!(world.store.count_by_type().await.unwrap().is_empty());
    for id in ["a", "b", "c"] {
        create(&world, "Patient", id, patient(id)).await;
    }
    create(
        &world,
        "Observation",
        "o",
        json!({"resourceType": "Observation"}),
    )
    .await;
    create(
        &world,
        "Encounter",
        "e",
        json!({"resourceType": "Encounter"}),
    )
    .await;
    update(&world, "Patient", "a", patient("a2")).await;
    delete(&world, "Patient", "b").await;
    delete(&world, "Encounter", "e").await;
    let mut counts = world.store.count_by_type().await.unwrap();
    counts.sort();
    assert_eq!(
        counts,
        [("Observation".to_owned(), 1), ("Patient".to_owned(), 2)]
    );
}

#[tokio::test]
async fn an_unknown_url_scheme_is_unsupported() {
    let clock = Arc::new(ManualClock::new(START));
    let err = haven_store::connect("mysql://localhost/db", clock)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unsupported(_)), "{err:?}");
}

#[tokio::test]
async fn an_in_memory_sqlite_url_gives_a_working_store() {
    let clock = Arc::new(ManualClock::new(START));
    let store = haven_store::connect("sqlite::memory:", clock)
        .await
        .unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.create("Patient", "m", patient("M")).await.unwrap();
    // A read outside the open transaction does not wait for it.
    assert_eq!(store.read("Patient", "m").await.unwrap(), None);
    tx.commit().await.unwrap();
    assert_eq!(
        store.read("Patient", "m").await.unwrap().unwrap().version,
        1
    );
}

#[tokio::test]
async fn migrate_alone_prepares_a_sqlite_file_that_connect_then_uses() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    haven_store::migrate(&url).await.unwrap();
    haven_store::migrate(&url).await.unwrap();
    let store = haven_store::connect(&url, Arc::new(ManualClock::new(START)))
        .await
        .unwrap();
    assert!(store.count_by_type().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_postgres_is_unavailable() {
    let clock = Arc::new(ManualClock::new(START));
    let err = haven_store::connect("postgres://nobody@127.0.0.1:1/none", clock)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

async fn a_content_filter_applies_before_paging_and_counting(world: World) {
    for (id, family) in [("a", "Keep"), ("b", "Drop"), ("c", "Keep"), ("d", "Keep")] {
        create(&world, "Patient", id, patient(family)).await;
        world.tick();
    }
    let keep = ContentFilter::new(|r: &Value| r["name"][0]["family"] == "Keep");
    let query = SearchQuery {
        count: 2,
        total: true,
        filter: Some(keep.clone()),
        ..search(Some("Patient"))
    };
    let first = world.store.search(&query).await.unwrap();
    assert_eq!(ids(&first), ["a", "c"]);
    assert_eq!(first.total, Some(3));
    assert!(first.more);
    let second = world
        .store
        .search(&SearchQuery {
            offset: 2,
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(ids(&second), ["d"]);
    assert!(!second.more);
    let counted = world
        .store
        .search(&SearchQuery { count: 0, ..query })
        .await
        .unwrap();
    assert_eq!(counted.total, Some(3));
    assert!(counted.resources.is_empty());
}

async fn a_content_filter_hides_versions_from_history(world: World) {
    create(&world, "Patient", "a", patient("Keep")).await;
    world.tick();
    update(&world, "Patient", "a", patient("Drop")).await;
    world.tick();
    create(&world, "Patient", "b", patient("Keep")).await;
    world.tick();
    delete(&world, "Patient", "b").await;
    let page = world
        .store
        .history(&HistoryQuery {
            total: true,
            filter: Some(ContentFilter::new(|r: &Value| {
                r["name"][0]["family"] == "Keep"
            })),
            ..history(Some("Patient"), None)
        })
        .await
        .unwrap();
    let seen: Vec<_> = page
        .versions
        .iter()
        .map(|v| (v.id.as_str(), v.version))
        .collect();
    assert_eq!(seen, [("b", 1), ("a", 1)]);
    assert_eq!(page.total, Some(2));
}

async fn auth_records_insert_once_and_expire(world: World) {
    let records = world.store.auth_records();
    let later = world.now() + Duration::seconds(60);
    assert!(records
        .insert("jti", "one", &json!({"n": 1}), Some(later))
        .await
        .unwrap());
    assert!(!records
        .insert("jti", "one", &json!({"n": 2}), Some(later))
        .await
        .unwrap());
    assert_eq!(
        records.get("jti", "one").await.unwrap(),
        Some(json!({"n": 1}))
    );
    assert_eq!(records.get("other", "one").await.unwrap(), None);

    world.clock.advance(Duration::seconds(61));
    assert_eq!(records.get("jti", "one").await.unwrap(), None);
    assert!(records
        .insert("jti", "one", &json!({"n": 3}), None)
        .await
        .unwrap());
    records
        .put("jti", "two", &json!({"n": 4}), None)
        .await
        .unwrap();
    records
        .put("jti", "two", &json!({"n": 5}), None)
        .await
        .unwrap();
    let listed = records.list("jti").await.unwrap();
    assert_eq!(
        listed,
        [
            ("one".to_string(), json!({"n": 3})),
            ("two".to_string(), json!({"n": 5}))
        ]
    );
    assert!(records.delete("jti", "one").await.unwrap());
    assert!(!records.delete("jti", "one").await.unwrap());
}

async fn auth_records_read_together_answer_in_the_order_asked(world: World) {
    let records = world.store.auth_records();
    let soon = world.now() + Duration::seconds(10);
    records
        .put("grant", "g1", &json!({"g": 1}), None)
        .await
        .unwrap();
    records
        .put("revoked", "t1", &json!({"t": 1}), Some(soon))
        .await
        .unwrap();
    // The same key under another kind is another record.
    records
        .put("jti", "g1", &json!({"j": 1}), None)
        .await
        .unwrap();
    assert!(records.get_each(&[]).await.unwrap().is_empty());
    let asked = [
        ("revoked", "t1"),
        ("grant", "missing"),
        ("grant", "g1"),
        ("revoked", "t1"),
    ];
    assert_eq!(
        records.get_each(&asked).await.unwrap(),
        [
            Some(json!({"t": 1})),
            None,
            Some(json!({"g": 1})),
            Some(json!({"t": 1}))
        ]
    );
    world.clock.advance(Duration::seconds(11));
    assert_eq!(
        records
            .get_each(&[("revoked", "t1"), ("grant", "g1")])
            .await
            .unwrap(),
        [None, Some(json!({"g": 1}))]
    );
}

async fn staged_auth_record_inserts_race_like_inserts_and_commit(world: World) {
    // Each racer learns before its commit whether it stored the record; exactly
    // one does, and once its commit is waited for, the record is there.
    let later = world.now() + Duration::seconds(60);
    let mut racing = Vec::new();
    for n in 0..12 {
        let store = world.store.clone();
        racing.push(tokio::spawn(async move {
            let staged = store
                .auth_records()
                .insert_staged("jti", "raced", &json!({"n": n}), Some(later))
                .await
                .unwrap();
            let inserted = staged.inserted;
            staged.committed().await.unwrap();
            (n, inserted)
        }));
    }
    let mut winners = Vec::new();
    for handle in racing {
        let (n, inserted) = handle.await.unwrap();
        if inserted {
            winners.push(n);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let records = world.store.auth_records();
    assert_eq!(
        records.get("jti", "raced").await.unwrap(),
        Some(json!({"n": winners[0]}))
    );
    let again = records
        .insert_staged("jti", "raced", &json!({}), Some(later))
        .await
        .unwrap();
    assert!(!again.inserted);
    again.committed().await.unwrap();
}

async fn auth_records_replace_only_what_they_expect(world: World) {
    let records = world.store.auth_records();
    let fresh = json!({"used": false, "grant": "g"});
    let used = json!({"used": true, "grant": "g"});
    records.put("code", "h", &fresh, None).await.unwrap();
    assert!(records.replace("code", "h", &fresh, &used).await.unwrap());
    // The second use finds the record changed: exactly one caller wins.
    assert!(!records.replace("code", "h", &fresh, &used).await.unwrap());
    assert!(!records
        .replace("code", "missing", &fresh, &used)
        .await
        .unwrap());
    assert_eq!(records.get("code", "h").await.unwrap(), Some(used));
}

async fn auth_records_written_at_once_each_get_their_own_answer(world: World) {
    // Concurrent writes share commits; each still learns what its own statement did.
    let later = world.now() + Duration::seconds(60);
    let mut racing = Vec::new();
    for n in 0..24 {
        let store = world.store.clone();
        let key = if n % 2 == 0 {
            "shared".to_string()
        } else {
            format!("own-{n}")
        };
        racing.push(tokio::spawn(async move {
            let first = store
                .auth_records()
                .insert("jti", &key, &json!({"n": n}), Some(later))
                .await
                .unwrap();
            (key, first)
        }));
    }
    let mut shared_wins = 0;
    for handle in racing {
        let (key, first) = handle.await.unwrap();
        if key == "shared" {
            shared_wins += usize::from(first);
        } else {
            assert!(first, "{key} had no rival");
        }
    }
    assert_eq!(shared_wins, 1, "exactly one of the racing inserts wins");
    let records = world.store.auth_records();
    assert_eq!(records.list("jti").await.unwrap().len(), 13);
    // Concurrent replacements of distinct records are all stored.
    let mut mixed = Vec::new();
    for n in 0..6 {
        let store = world.store.clone();
        mixed.push(tokio::spawn(async move {
            let records = store.auth_records();
            records
                .put("code", &format!("c{n}"), &json!({"n": n}), None)
                .await
        }));
    }
    for handle in mixed {
        handle.await.unwrap().unwrap();
    }
    assert_eq!(records.list("code").await.unwrap().len(), 6);
}

// ---------------------------------------------------------------------------
// The audit trail
// ---------------------------------------------------------------------------

const REST: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";

/// A small AuditEvent told apart from others by `outcomeDesc`.
fn audit_event(mark: &str) -> Value {
    json!({
        "resourceType": "AuditEvent",
        "type": {"system": REST, "code": "rest"},
        "subtype": [{"system": INTERACTION, "code": "read"}],
        "action": "R",
        "recorded": format_instant(START),
        "outcome": "0",
        "outcomeDesc": mark,
        "agent": [{"who": {"reference": "Practitioner/1"}, "requestor": true}],
        "source": {"observer": {"display": "haven"}}
    })
}

fn mark(record: &AuditRecord) -> String {
    record.event["outcomeDesc"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn marks(records: &[AuditRecord]) -> Vec<String> {
    records.iter().map(mark).collect()
}

/// The whole chain, read in small pages as `haven audit verify` would.
async fn whole_chain(store: &dyn Store) -> Vec<AuditRecord> {
    let mut records: Vec<AuditRecord> = Vec::new();
    loop {
        let after = records.last().map_or(0, |r| r.position);
        let page = store.audit_log().chain(after, 7).await.unwrap();
        if page.is_empty() {
            return records;
        }
        assert!(page.len() <= 7);
        records.extend(page);
    }
}

async fn verify_chain(store: &dyn Store) -> Result<u64, ChainBreak> {
    let links: Vec<StoredLink> = whole_chain(store)
        .await
        .into_iter()
        .map(StoredLink::from)
        .collect();
    haven_audit::verify(&links)
}

/// Rows of text columns, as [`Direct::texts`] reads them.
type TextRows = Vec<Vec<Option<String>>>;

/// A direct connection to the story's database, outside the store.
enum Direct {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Direct {
    async fn open(world: &World) -> Self {
        use sqlx::Connection;
        match world.store.backend() {
            Backend::Sqlite => Direct::Sqlite(
                sqlx::SqliteConnection::connect(&world.url)
                    .await
                    .expect("direct sqlite connection"),
            ),
            Backend::Postgres => Direct::Postgres(
                sqlx::PgConnection::connect(&world.url)
                    .await
                    .expect("direct postgres connection"),
            ),
        }
    }

    /// Runs statements; the database's refusal is returned, not raised.
    /// Boxed as `Send` here, where the lifetimes are concrete: sqlx's executor
    /// futures otherwise fail the `Send` check of the spawned stories.
    fn run<'a>(
        &'a mut self,
        statements: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'a>> {
        use sqlx::Executor;
        match self {
            Direct::Sqlite(conn) => {
                Box::pin(async move { conn.execute(sqlx::raw_sql(statements)).await.map(drop) })
            }
            Direct::Postgres(conn) => {
                Box::pin(async move { conn.execute(sqlx::raw_sql(statements)).await.map(drop) })
            }
        }
    }

    /// Every row of a query, each column read as text (NULL as `None`), sorted.
    fn texts<'a>(
        &'a mut self,
        query: &'a str,
    ) -> Pin<Box<dyn Future<Output = TextRows> + Send + 'a>> {
        use sqlx::Row;
        fn decode<R: Row>(rows: Vec<R>) -> TextRows
        where
            for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            let mut rows: TextRows = rows
                .iter()
                .map(|row| {
                    (0..row.len())
                        .map(|i| row.try_get::<Option<String>, _>(i).expect("text column"))
                        .collect()
                })
                .collect();
            rows.sort();
            rows
        }
        match self {
            Direct::Sqlite(conn) => {
                Box::pin(
                    async move { decode(sqlx::query(query).fetch_all(conn).await.expect(query)) },
                )
            }
            Direct::Postgres(conn) => {
                Box::pin(
                    async move { decode(sqlx::query(query).fetch_all(conn).await.expect(query)) },
                )
            }
        }
    }

    /// An instant column as text in the store's `format_instant` form.
    fn instant(&self, column: &str) -> String {
        match self {
            Direct::Sqlite(_) => column.to_owned(),
            Direct::Postgres(_) => {
                format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            }
        }
    }

    async fn must(&mut self, statements: &str) {
        self.run(statements).await.expect(statements);
    }

    /// Drops the append-only triggers, as an attacker with database access could.
    async fn drop_append_only_triggers(&mut self) {
        let statements = match self {
            Direct::Sqlite(_) => {
                "DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete; \
                 DROP TRIGGER audit_index_no_update; DROP TRIGGER audit_index_no_delete;"
            }
            Direct::Postgres(_) => {
                "DROP TRIGGER audit_events_append_only ON audit_events; \
                 DROP TRIGGER audit_index_append_only ON audit_index;"
            }
        };
        self.must(statements).await;
    }

    /// Makes the database refuse every new audit record, or (`false`) stops that.
    async fn refuse_audit_inserts(&mut self, refuse: bool) {
        let statements = match (&self, refuse) {
            (Direct::Sqlite(_), true) => {
                "CREATE TRIGGER test_refuse_audit BEFORE INSERT ON audit_events \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
            }
            (Direct::Sqlite(_), false) => "DROP TRIGGER test_refuse_audit;",
            (Direct::Postgres(_), true) => {
                "CREATE FUNCTION test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
                 CREATE TRIGGER test_refuse_audit BEFORE INSERT ON audit_events \
                 FOR EACH ROW EXECUTE FUNCTION test_refuse_audit();"
            }
            (Direct::Postgres(_), false) => {
                "DROP TRIGGER test_refuse_audit ON audit_events; \
                 DROP FUNCTION test_refuse_audit();"
            }
        };
        self.must(statements).await;
    }
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

async fn appended_audit_events_get_ids_meta_and_consecutive_positions_after_genesis(world: World) {
    let log = world.store.audit_log();
    let mut chosen = audit_event("second");
    chosen["id"] = json!("client-chosen");
    chosen["meta"] = json!({"versionId": "7", "source": "kept"});
    append_directly(world.store.as_ref(), vec![audit_event("first"), chosen])
        .await
        .unwrap();
    world.tick();
    append_directly(world.store.as_ref(), vec![audit_event("third")])
        .await
        .unwrap();
    // An empty append stores nothing, and a non-object is refused before anything is.
    log.append(Vec::new()).await.unwrap();
    let refused = append_directly(
        world.store.as_ref(),
        vec![audit_event("never"), json!("not an object")],
    )
    .await;
    assert!(
        matches!(refused, Err(StoreError::Database(_))),
        "{refused:?}"
    );

    let records = log.chain(0, 100).await.unwrap();
    assert_eq!(marks(&records), ["first", "second", "third"]);
    assert_eq!(
        records.iter().map(|r| r.position).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(records[0].previous_hash, GENESIS);
    for pair in records.windows(2) {
        assert_eq!(pair[1].previous_hash, pair[0].hash);
    }
    for record in &records {
        // The event as read back hashes to the stored hash.
        assert_eq!(
            record.hash,
            link_hash(&record.previous_hash, &canonical_json(&record.event))
        );
        assert_eq!(record.event["resourceType"], "AuditEvent");
        assert_eq!(record.event["meta"]["versionId"], "1");
        let id = record.event["id"].as_str().unwrap();
        assert_eq!(id.len(), 36, "a UUID: {id}");
    }
    assert_ne!(records[0].event["id"], records[1].event["id"]);
    assert_ne!(records[1].event["id"], "client-chosen");
    assert_eq!(records[1].event["meta"]["source"], "kept");
    assert_eq!(
        records[0].event["meta"]["lastUpdated"],
        format_instant(START)
    );
    assert_eq!(
        records[2].event["meta"]["lastUpdated"],
        format_instant(world.now())
    );
    assert_eq!(verify_chain(world.store.as_ref()).await, Ok(3));

    // chain() pages by position.
    let positions =
        |records: Vec<AuditRecord>| -> Vec<u64> { records.iter().map(|r| r.position).collect() };
    assert_eq!(positions(log.chain(0, 2).await.unwrap()), [1, 2]);
    assert_eq!(positions(log.chain(1, 1).await.unwrap()), [2]);
    assert_eq!(positions(log.chain(2, 10).await.unwrap()), [3]);
    assert!(log.chain(3, 10).await.unwrap().is_empty());
    assert!(log.chain(0, 0).await.unwrap().is_empty());

    // Another connection to the database reads the same chain.
    let again = haven_store::connect(&world.url, world.clock.clone())
        .await
        .unwrap();
    assert_eq!(again.audit_log().chain(0, 100).await.unwrap(), records);
}

async fn audit_events_appended_in_a_transaction_commit_with_its_writes_or_not_at_all(world: World) {
    let mut tx = world.store.begin().await.unwrap();
    tx.create("Patient", "kept", patient("K")).await.unwrap();
    tx.append_audit(vec![audit_event("one"), audit_event("two")])
        .await
        .unwrap();
    // Not visible outside the transaction before it commits.
    assert!(world
        .store
        .audit_log()
        .chain(0, 10)
        .await
        .unwrap()
        .is_empty());
    tx.commit().await.unwrap();
    assert!(world.store.read("Patient", "kept").await.unwrap().is_some());
    assert_eq!(
        marks(&world.store.audit_log().chain(0, 10).await.unwrap()),
        ["one", "two"]
    );

    {
        let mut tx = world.store.begin().await.unwrap();
        tx.create("Patient", "dropped", patient("D")).await.unwrap();
        tx.append_audit(vec![audit_event("dropped")]).await.unwrap();
    }
    assert_eq!(world.store.read("Patient", "dropped").await.unwrap(), None);
    assert_eq!(
        marks(&world.store.audit_log().chain(0, 10).await.unwrap()),
        ["one", "two"]
    );

    // The rolled-back position is taken by the next append: no gap.
    append_directly(world.store.as_ref(), vec![audit_event("three")])
        .await
        .unwrap();
    let records = world.store.audit_log().chain(0, 10).await.unwrap();
    assert_eq!(marks(&records), ["one", "two", "three"]);
    assert_eq!(records[2].position, 3);
    assert_eq!(verify_chain(world.store.as_ref()).await, Ok(3));
}

async fn audit_events_appended_in_a_transaction_outlast_a_refused_create_and_precede_its_reads(
    world: World,
) {
    create(&world, "Patient", "taken", patient("First")).await;

    let mut tx = world.store.begin().await.unwrap();
    tx.append_audit(vec![audit_event("before a taken id")])
        .await
        .unwrap();
    let refused = tx.create("Patient", "taken", patient("Second")).await;
    assert!(
        matches!(refused, Err(StoreError::AlreadyExists { .. })),
        "{refused:?}"
    );
    tx.append_audit(vec![audit_event("before a read")])
        .await
        .unwrap();
    let read = tx.read("Patient", "taken").await.unwrap().unwrap();
    assert_eq!(read.resource.unwrap()["name"][0]["family"], "First");
    tx.append_audit(vec![audit_event("before the commit")])
        .await
        .unwrap();
    tx.create("Patient", "fresh", patient("Third"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let records = world.store.audit_log().chain(0, 10).await.unwrap();
    assert_eq!(
        marks(&records),
        ["before a taken id", "before a read", "before the commit"]
    );
    assert_eq!(verify_chain(world.store.as_ref()).await, Ok(3));
    assert!(world
        .store
        .read("Patient", "fresh")
        .await
        .unwrap()
        .is_some());
    let kept = world.store.read("Patient", "taken").await.unwrap().unwrap();
    assert_eq!(kept.version, 1);
}

/// Appends events by the audit log itself, without the group writer.
async fn append_directly(store: &dyn Store, events: Vec<Value>) -> haven_store::Result<()> {
    let log = store.audit_log();
    log.append(log.stamp(events)?).await
}

async fn concurrent_appends_by_every_path_leave_one_unbroken_chain(world: World) {
    let writer = AuditWriter::start(world.store.clone());
    // A second store on the same database stands in for another server process.
    let other = haven_store::connect(&world.url, world.clock.clone())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    let mut expected = Vec::new();
    for task in 0..40 {
        let path = task % 5;
        let count = if path == 1 || path == 2 { 2 } else { 1 };
        let events: Vec<Value> = (0..count)
            .map(|n| {
                let mark = format!("task {task} event {n}");
                expected.push(mark.clone());
                audit_event(&mark)
            })
            .collect();
        let store = world.store.clone();
        let other = other.clone();
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            match path {
                0 => writer.append(events.into_iter().next().unwrap()).await,
                1 => append_directly(store.as_ref(), events).await,
                2 => {
                    // Two appends in one transaction, a write between them.
                    let mut events = events.into_iter();
                    let mut tx = store.begin().await?;
                    tx.append_audit(events.next().into_iter().collect()).await?;
                    tx.create("Patient", &format!("p{task}"), patient("P"))
                        .await?;
                    tx.append_audit(events.collect()).await?;
                    tx.commit().await
                }
                3 => {
                    let mut tx = store.begin_large().await?;
                    tx.create("Patient", &format!("p{task}"), patient("P"))
                        .await?;
                    tx.append_audit(events).await?;
                    tx.commit().await
                }
                _ => append_directly(other.as_ref(), events).await,
            }
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let records = whole_chain(world.store.as_ref()).await;
    assert_eq!(records.len(), expected.len());
    let positions: Vec<u64> = records.iter().map(|r| r.position).collect();
    let consecutive: Vec<u64> = (1..=expected.len() as u64).collect();
    assert_eq!(positions, consecutive);
    assert_eq!(
        verify_chain(world.store.as_ref()).await,
        Ok(expected.len() as u64)
    );
    let mut stored = marks(&records);
    stored.sort();
    expected.sort();
    assert_eq!(stored, expected);
    assert_eq!(
        world.store.count_by_type().await.unwrap(),
        [("Patient".to_owned(), 16)]
    );
}

async fn the_audit_writer_answers_every_waiter_and_fails_them_all_when_the_database_refuses(
    world: World,
) {
    let writer = AuditWriter::start(world.store.clone());
    let waiters: Vec<_> = (0..30)
        .map(|n| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.append(audit_event(&format!("ok {n}"))).await })
        })
        .collect();
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
    assert_eq!(verify_chain(world.store.as_ref()).await, Ok(30));

    let mut direct = Direct::open(&world).await;
    direct.refuse_audit_inserts(true).await;
    let waiters: Vec<_> = (0..20)
        .map(|n| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.append(audit_event(&format!("refused {n}"))).await })
        })
        .collect();
    for waiter in waiters {
        let answer = waiter.await.unwrap();
        assert!(matches!(answer, Err(StoreError::Database(_))), "{answer:?}");
    }
    direct.refuse_audit_inserts(false).await;

    // The writer carries on once the database accepts records again.
    writer.append(audit_event("after")).await.unwrap();
    let records = whole_chain(world.store.as_ref()).await;
    assert_eq!(records.len(), 31);
    assert_eq!(mark(&records[30]), "after");
    assert!(records.iter().all(|r| !mark(r).starts_with("refused")));
    assert_eq!(verify_chain(world.store.as_ref()).await, Ok(31));
    assert!(format!("{writer:?}").starts_with("AuditWriter"));
}

/// A role without INSERT on the audit table, made for one story and dropped after it.
struct Role {
    name: String,
    url: String,
}

impl Role {
    async fn create(world: &World, direct: &mut Direct) -> Self {
        let name = format!("haven_role_{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        direct
            .must(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD {password}; \
                 GRANT USAGE, CREATE ON SCHEMA public TO {name}; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {name}; \
                 GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {name};",
                password = literal(&password)
            ))
            .await;
        let url = with_user(&world.url, &name, &password);
        Role { name, url }
    }

    async fn drop(self, direct: &mut Direct) {
        direct
            .must(&format!(
                "DROP OWNED BY {name}; DROP ROLE {name};",
                name = self.name
            ))
            .await;
    }
}

/// A PostgreSQL URL with its user and password replaced.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let scheme_end = url.find("://").expect("a URL with a scheme") + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host_start = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
    format!(
        "{}{user}:{password}@{}",
        &url[..scheme_end],
        &rest[host_start..]
    )
}

async fn an_unwritable_audit_table_fails_every_append_and_the_transaction_around_it(world: World) {
    let mut direct = Direct::open(&world).await;
    let role = match world.store.backend() {
        // SQLite has no privileges: a trigger refuses instead.
        Backend::Sqlite => {
            direct.refuse_audit_inserts(true).await;
            None
        }
        Backend::Postgres => {
            assert!(world.admin_url.is_some());
            Some(Role::create(&world, &mut direct).await)
        }
    };
    let store = match &role {
        None => world.store.clone(),
        Some(role) => haven_store::connect(&role.url, world.clock.clone())
            .await
            .expect("a store as the restricted role"),
    };
    // Run as a task so that the role is dropped even when an assertion fails.
    let story = tokio::spawn(async move {
        // The store works as that role for resources and reading.
        let mut tx = store.begin().await.unwrap();
        tx.create("Patient", "allowed", patient("A")).await.unwrap();
        tx.commit().await.unwrap();
        store.audit_log().chain(0, 10).await.unwrap();
        store
    });
    let store = match story.await {
        Ok(store) => store,
        Err(failure) => {
            if let Some(role) = role {
                role.drop(&mut direct).await;
            }
            std::panic::resume_unwind(failure.into_panic());
        }
    };
    if let Some(role) = &role {
        direct
            .must(&format!("REVOKE INSERT ON audit_events FROM {}", role.name))
            .await;
    }
    let story = tokio::spawn(async move {
        let refused = append_directly(store.as_ref(), vec![audit_event("direct")]).await;
        assert!(
            matches!(refused, Err(StoreError::Database(_))),
            "{refused:?}"
        );

        let writer = AuditWriter::start(store.clone());
        let refused = writer.append(audit_event("grouped")).await;
        assert!(
            matches!(refused, Err(StoreError::Database(_))),
            "{refused:?}"
        );

        let mut tx = store.begin().await.unwrap();
        tx.create("Patient", "audited", patient("X")).await.unwrap();
        // The records are sent with the transaction's next statement (SQLite)
        // or at commit (PostgreSQL): here the commit, which is refused.
        let appended = tx.append_audit(vec![audit_event("in a transaction")]).await;
        assert!(appended.is_ok(), "{appended:?}");
        let committed = tx.commit().await;
        assert!(
            matches!(committed, Err(StoreError::Database(_))),
            "{committed:?}"
        );
        assert_eq!(store.read("Patient", "audited").await.unwrap(), None);

        // Records appended before a write: on SQLite they go with the write's
        // statements, which are refused with them; on PostgreSQL at commit.
        let mut tx = store.begin().await.unwrap();
        let appended = tx.append_audit(vec![audit_event("before a write")]).await;
        assert!(appended.is_ok(), "{appended:?}");
        let written = tx.create("Patient", "after", patient("Y")).await;
        match store.backend() {
            Backend::Sqlite => assert!(
                matches!(written, Err(StoreError::Database(_))),
                "{written:?}"
            ),
            Backend::Postgres => assert!(written.is_ok(), "{written:?}"),
        }
        assert!(tx.commit().await.is_err());
        assert_eq!(store.read("Patient", "after").await.unwrap(), None);
        assert!(store.read("Patient", "allowed").await.unwrap().is_some());
        assert!(store.audit_log().chain(0, 10).await.unwrap().is_empty());
    });
    let outcome = story.await;
    if let Some(role) = role {
        role.drop(&mut direct).await;
    } else {
        direct.refuse_audit_inserts(false).await;
    }
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
    // Seen through the story's own store too.
    assert_eq!(world.store.read("Patient", "audited").await.unwrap(), None);
    assert!(world
        .store
        .audit_log()
        .chain(0, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn the_database_refuses_to_change_or_remove_audit_records(world: World) {
    append_directly(
        world.store.as_ref(),
        vec![audit_event("one"), audit_event("two")],
    )
    .await
    .unwrap();
    let before = whole_chain(world.store.as_ref()).await;
    let mut direct = Direct::open(&world).await;
    let mut refused = vec![
        "UPDATE audit_events SET event = '{}' WHERE position = 1",
        "UPDATE audit_events SET position = position + 10",
        "DELETE FROM audit_events WHERE position = 2",
        "DELETE FROM audit_events",
        "UPDATE audit_index SET value = 'Practitioner/2'",
        "DELETE FROM audit_index",
    ];
    if world.store.backend() == Backend::Postgres {
        refused.extend(["TRUNCATE audit_events", "TRUNCATE audit_index"]);
    }
    for statement in refused {
        let outcome = direct.run(statement).await;
        let Err(sqlx::Error::Database(error)) = outcome else {
            panic!("{statement} was not refused: {outcome:?}");
        };
        assert!(
            error.message().contains("append-only"),
            "{statement}: {error}"
        );
    }
    assert_eq!(whole_chain(world.store.as_ref()).await, before);
    let query = AuditQuery {
        agent: vec!["Practitioner/1".into()],
        ..audit_query()
    };
    assert_eq!(
        world
            .store
            .audit_log()
            .search(&query)
            .await
            .unwrap()
            .records
            .len(),
        2
    );
}

/// Six events, one append each, and an untouched chain that verifies.
async fn six_audit_events(world: &World) {
    for n in 1..=6 {
        append_directly(
            world.store.as_ref(),
            vec![audit_event(&format!("event {n}"))],
        )
        .await
        .unwrap();
        world.tick();
    }
    assert_eq!(verify_chain(world.store.as_ref()).await, Ok(6));
}

async fn verify_names_a_changed_audit_record(world: World) {
    six_audit_events(&world).await;
    let mut direct = Direct::open(&world).await;
    direct.drop_append_only_triggers().await;
    direct
        .must(
            "UPDATE audit_events SET event = replace(event, '\"outcome\":\"0\"', '\"outcome\":\"8\"') \
             WHERE position = 4",
        )
        .await;
    let records = whole_chain(world.store.as_ref()).await;
    assert_eq!(records[3].event["outcome"], "8");
    assert_eq!(
        verify_chain(world.store.as_ref()).await,
        Err(ChainBreak {
            position: 4,
            kind: BreakKind::Changed
        })
    );
}

async fn verify_names_the_record_after_a_removed_one(world: World) {
    six_audit_events(&world).await;
    let mut direct = Direct::open(&world).await;
    direct.drop_append_only_triggers().await;
    direct
        .must(
            "DELETE FROM audit_index WHERE position = 3; \
             DELETE FROM audit_events WHERE position = 3;",
        )
        .await;
    assert_eq!(whole_chain(world.store.as_ref()).await.len(), 5);
    assert_eq!(
        verify_chain(world.store.as_ref()).await,
        Err(ChainBreak {
            position: 4,
            kind: BreakKind::Removed
        })
    );
}

async fn verify_names_where_a_forged_record_was_slipped_in(world: World) {
    six_audit_events(&world).await;
    let records = whole_chain(world.store.as_ref()).await;
    // The attacker knows the hash formula: the forged record follows record 3
    // and hashes correctly, and the later records move up one position.
    let mut forged = records[2].event.clone();
    forged["id"] = json!("forged");
    forged["outcomeDesc"] = json!("forged");
    let previous_hash = records[2].hash.clone();
    let hash = link_hash(&previous_hash, &canonical_json(&forged));
    let mut direct = Direct::open(&world).await;
    direct.drop_append_only_triggers().await;
    direct
        .must(&format!(
            "UPDATE audit_events SET position = position + 1000000 WHERE position > 3; \
             UPDATE audit_events SET position = position - 999999 WHERE position > 1000000; \
             INSERT INTO audit_events (position, id, recorded, event, previous_hash, hash) \
             VALUES (4, 'forged', {recorded}, {event}, {previous_hash}, {hash});",
            recorded = literal(&format_instant(START)),
            event = literal(&forged.to_string()),
            previous_hash = literal(&previous_hash),
            hash = literal(&hash),
        ))
        .await;
    let tampered = whole_chain(world.store.as_ref()).await;
    assert_eq!(
        marks(&tampered),
        ["event 1", "event 2", "event 3", "forged", "event 4", "event 5", "event 6"]
    );
    // The forged record itself is sound; the genuine record after it no longer
    // follows its predecessor, and that is where the chain breaks.
    assert_eq!(
        verify_chain(world.store.as_ref()).await,
        Err(ChainBreak {
            position: 5,
            kind: BreakKind::Inserted
        })
    );

    // A forger who does not know the formula is caught at the forged record.
    direct
        .must(&format!(
            "UPDATE audit_events SET previous_hash = {} WHERE position = 4",
            literal(&records[0].hash)
        ))
        .await;
    let verdict = verify_chain(world.store.as_ref()).await;
    assert_eq!(verdict.map_err(|b| b.position), Err(4));
}

fn audit_query() -> AuditQuery {
    AuditQuery {
        count: 100,
        ..AuditQuery::default()
    }
}

fn token(system: Option<&str>, code: Option<&str>) -> TokenValue {
    TokenValue {
        system: system.map(str::to_owned),
        code: code.map(str::to_owned),
    }
}

/// Five events, oldest first: e1 at 10:00 through e5 at 14:00.
async fn five_varied_audit_events(world: &World) {
    let events = [
        json!({
            "resourceType": "AuditEvent", "outcomeDesc": "e1",
            "type": {"system": DCM, "code": "110112"},
            "subtype": [{"system": INTERACTION, "code": "search-type"}],
            "action": "E", "outcome": "0",
            // An offset other than UTC: 10:00Z.
            "recorded": "2026-03-01T11:00:00+01:00",
            "agent": [{"who": {"reference": "Practitioner/1",
                               "identifier": {"value": "client-a"}}}],
            "entity": [{"what": {"reference": "Patient/1/_history/2"}}]
        }),
        json!({
            "resourceType": "AuditEvent", "outcomeDesc": "e2",
            "type": {"system": REST, "code": "rest"},
            "subtype": [{"system": INTERACTION, "code": "read"}],
            "action": "R", "outcome": "0",
            "recorded": "2026-03-01T11:00:00Z",
            "agent": [{"who": {"reference": "Patient/1", "identifier": {"value": "user-p"}}}],
            "entity": [{"what": {"reference": "Observation/5/_history/1"}}]
        }),
        json!({
            "resourceType": "AuditEvent", "outcomeDesc": "e3",
            "type": {"system": REST, "code": "rest"},
            "subtype": [{"system": INTERACTION, "code": "create"}],
            "action": "C", "outcome": "4",
            "recorded": "2026-03-01T12:00:00Z",
            "agent": [{"who": {"reference": "Practitioner/2",
                               "identifier": {"value": "client-b"}}}],
            "entity": [{"what": {"reference": "Patient/2/_history/1"}}]
        }),
        json!({
            "resourceType": "AuditEvent", "outcomeDesc": "e4",
            "type": {"system": DCM, "code": "110114"},
            "action": "E", "outcome": "8",
            "recorded": "2026-03-01T13:00:00Z",
            "agent": [{"who": {"identifier": {"value": "user-q"}}}]
        }),
        json!({
            "resourceType": "AuditEvent", "outcomeDesc": "e5",
            "type": {"code": "local"},
            "subtype": [{"system": INTERACTION, "code": "update"}],
            "action": "U", "outcome": "12",
            "recorded": "2026-03-01T14:00:00Z",
            "agent": [{"who": {"reference": "Practitioner/1"}}],
            "entity": [{"what": {"reference": "Patient/1"}},
                       {"what": {"reference": "Observation/5"}}]
        }),
    ];
    for event in events {
        append_directly(world.store.as_ref(), vec![event])
            .await
            .unwrap();
        world.tick();
    }
}

async fn audit_search_finds_events_by_every_parameter(world: World) {
    five_varied_audit_events(&world).await;
    let log = world.store.audit_log();
    let found =
        |query: AuditQuery| async move { marks(&log.search(&query).await.unwrap().records) };
    let at = |hour: u8| datetime!(2026-03-01 00:00 UTC).replace_hour(hour).unwrap();
    let bound = |comparator, hour| InstantBound {
        comparator,
        instant: at(hour),
    };

    assert_eq!(found(audit_query()).await, ["e5", "e4", "e3", "e2", "e1"]);
    let query = AuditQuery {
        date: vec![bound(Comparator::Ge, 11), bound(Comparator::Lt, 13)],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e3", "e2"]);
    let query = AuditQuery {
        date: vec![bound(Comparator::Le, 11)],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e2", "e1"]);
    let query = AuditQuery {
        date: vec![bound(Comparator::Gt, 13)],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e5"]);

    let by = |agent: &[&str]| AuditQuery {
        agent: agent.iter().map(|a| (*a).to_owned()).collect(),
        ..audit_query()
    };
    assert_eq!(found(by(&["Practitioner/1"])).await, ["e5", "e1"]);
    assert_eq!(found(by(&["client-b", "user-q"])).await, ["e4", "e3"]);
    assert!(found(by(&["nobody"])).await.is_empty());

    let about = |patient: &[&str]| AuditQuery {
        patient: patient.iter().map(|p| (*p).to_owned()).collect(),
        ..audit_query()
    };
    // As an entity (versioned or not) or as the agent.
    assert_eq!(found(about(&["Patient/1"])).await, ["e5", "e2", "e1"]);
    assert_eq!(found(about(&["Patient/2"])).await, ["e3"]);

    let on = |entity: &[&str]| AuditQuery {
        entity: entity.iter().map(|e| (*e).to_owned()).collect(),
        ..audit_query()
    };
    assert_eq!(found(on(&["Patient/1"])).await, ["e5", "e1"]);
    assert_eq!(found(on(&["Patient/1/_history/2"])).await, ["e1"]);
    assert!(found(on(&["Patient/1/_history/1"])).await.is_empty());
    assert_eq!(found(on(&["Observation/5"])).await, ["e5", "e2"]);

    let query = AuditQuery {
        outcome: vec!["4".into(), "8".into()],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e4", "e3"]);
    let query = AuditQuery {
        action: vec!["E".into()],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e4", "e1"]);

    let typed = |tokens: Vec<TokenValue>| AuditQuery {
        event_type: tokens,
        ..audit_query()
    };
    assert_eq!(
        found(typed(vec![token(Some(DCM), Some("110112"))])).await,
        ["e1"]
    );
    assert_eq!(
        found(typed(vec![token(None, Some("110114"))])).await,
        ["e4"]
    );
    assert_eq!(
        found(typed(vec![token(Some(""), Some("local"))])).await,
        ["e5"]
    );
    assert!(found(typed(vec![token(Some(""), Some("110112"))]))
        .await
        .is_empty());
    assert_eq!(
        found(typed(vec![token(Some(REST), None)])).await,
        ["e3", "e2"]
    );
    assert_eq!(
        found(typed(vec![
            token(Some(DCM), None),
            token(None, Some("local"))
        ]))
        .await,
        ["e5", "e4", "e1"]
    );
    let query = AuditQuery {
        subtype: vec![
            token(Some(INTERACTION), Some("read")),
            token(None, Some("create")),
        ],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e3", "e2"]);

    // Criteria combine with AND.
    let query = AuditQuery {
        action: vec!["E".into()],
        outcome: vec!["0".into()],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e1"]);

    let all = log.search(&audit_query()).await.unwrap().records;
    let id_of = |n: usize| all[n].event["id"].as_str().unwrap().to_owned();
    let query = AuditQuery {
        ids: vec![id_of(1), id_of(3), "unknown".into()],
        ..audit_query()
    };
    assert_eq!(found(query).await, ["e4", "e2"]);
}

async fn audit_search_pages_counts_and_applies_a_content_filter_first(world: World) {
    five_varied_audit_events(&world).await;
    let log = world.store.audit_log();
    let query = AuditQuery {
        count: 2,
        total: true,
        ..AuditQuery::default()
    };
    let first = log.search(&query).await.unwrap();
    assert_eq!(marks(&first.records), ["e5", "e4"]);
    assert_eq!(first.total, Some(5));
    assert!(first.more);
    let second = log
        .search(&AuditQuery {
            offset: 2,
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(marks(&second.records), ["e3", "e2"]);
    assert!(second.more);
    let last = log
        .search(&AuditQuery {
            offset: 4,
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(marks(&last.records), ["e1"]);
    assert!(!last.more);
    let counted = log
        .search(&AuditQuery {
            count: 0,
            ..query.clone()
        })
        .await
        .unwrap();
    assert!(counted.records.is_empty());
    assert_eq!(counted.total, Some(5));
    assert!(counted.more);
    let untotalled = log
        .search(&AuditQuery {
            total: false,
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(untotalled.total, None);

    // An access rule that hides the E events from this reader.
    let hidden = ContentFilter::new(|event: &Value| event["action"] != "E");
    let filtered = AuditQuery {
        filter: Some(hidden),
        ..query
    };
    let first = log.search(&filtered).await.unwrap();
    assert_eq!(marks(&first.records), ["e5", "e3"]);
    assert_eq!(first.total, Some(3));
    assert!(first.more);
    let second = log
        .search(&AuditQuery {
            offset: 2,
            ..filtered.clone()
        })
        .await
        .unwrap();
    assert_eq!(marks(&second.records), ["e2"]);
    assert!(!second.more);
    let counted = log
        .search(&AuditQuery {
            count: 0,
            ..filtered.clone()
        })
        .await
        .unwrap();
    assert!(counted.records.is_empty());
    assert_eq!(counted.total, Some(3));
    // With other criteria too.
    let failures = log
        .search(&AuditQuery {
            outcome: vec!["4".into(), "8".into()],
            ..filtered
        })
        .await
        .unwrap();
    assert_eq!(marks(&failures.records), ["e3"]);
    assert_eq!(failures.total, Some(1));
}

async fn an_audit_event_is_read_by_id(world: World) {
    append_directly(
        world.store.as_ref(),
        vec![audit_event("one"), audit_event("two")],
    )
    .await
    .unwrap();
    let records = world.store.audit_log().chain(0, 10).await.unwrap();
    for record in &records {
        let id = record.event["id"].as_str().unwrap();
        let read = world.store.audit_log().read(id).await.unwrap();
        assert_eq!(read.as_ref(), Some(record));
    }
    assert_eq!(world.store.audit_log().read("unknown").await.unwrap(), None);
}

/// How many index rows of every table a resource has.
async fn index_row_count(direct: &mut Direct, resource_type: &str, id: &str) -> usize {
    let mut total = 0;
    for table in [
        "search_string",
        "search_token",
        "search_token_of_type",
        "search_reference",
        "search_date",
        "search_number",
        "search_quantity",
        "search_uri",
        "search_composite",
    ] {
        total += direct
            .texts(&format!(
                "SELECT param FROM {table} WHERE resource_type = '{resource_type}' AND id = '{id}'"
            ))
            .await
            .len();
    }
    total
}

fn texts(row: &[&str]) -> Vec<Option<String>> {
    row.iter().map(|t| Some((*t).to_owned())).collect()
}

async fn family_rows(direct: &mut Direct, id: &str) -> TextRows {
    direct
        .texts(&format!(
            "SELECT normalized, exact FROM search_string \
             WHERE resource_type = 'Patient' AND id = '{id}' AND param = 'family'"
        ))
        .await
}

async fn a_created_patient_has_folded_string_rows(world: World) {
    create(&world, "Patient", "p1", patient("Müller-Łopez")).await;
    let mut direct = Direct::open(&world).await;
    assert_eq!(
        family_rows(&mut direct, "p1").await,
        [texts(&["muller-łopez", "Müller-Łopez"])]
    );
    // The name parts also feed the `name` string parameter.
    let name = direct
        .texts(
            "SELECT normalized FROM search_string \
             WHERE resource_type = 'Patient' AND id = 'p1' AND param = 'name'",
        )
        .await;
    assert!(name.contains(&texts(&["muller-łopez"])), "{name:?}");
}

fn observation(subject: &str, code: &str, value: i64) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": "Heart rate"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2021-03-04",
        "valueQuantity": {
            "value": value,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min"
        }
    })
}

async fn an_observation_has_token_reference_date_and_quantity_rows(world: World) {
    create(&world, "Patient", "p1", patient("P")).await;
    create(
        &world,
        "Observation",
        "o1",
        observation("Patient/p1", "8867-4", 72),
    )
    .await;
    let mut direct = Direct::open(&world).await;
    let codes = direct
        .texts(
            "SELECT system, code, text FROM search_token \
             WHERE resource_type = 'Observation' AND id = 'o1' AND param = 'code'",
        )
        .await;
    assert_eq!(
        codes,
        [texts(&["http://loinc.org", "8867-4", "heart rate"])]
    );
    let subject = direct
        .texts(
            "SELECT param, target_type, target_id FROM search_reference \
             WHERE resource_type = 'Observation' AND id = 'o1' \
             AND param IN ('subject', 'patient')",
        )
        .await;
    assert_eq!(
        subject,
        [
            texts(&["patient", "Patient", "p1"]),
            texts(&["subject", "Patient", "p1"])
        ]
    );
    let (low, high) = (direct.instant("low"), direct.instant("high"));
    let dates = direct
        .texts(&format!(
            "SELECT {low}, {high} FROM search_date \
             WHERE resource_type = 'Observation' AND id = 'o1' AND param = 'date'"
        ))
        .await;
    assert_eq!(
        dates,
        [texts(&[
            "2021-03-04T00:00:00.000000Z",
            "2021-03-05T00:00:00.000000Z"
        ])]
    );
    let quantities = direct
        .texts(
            "SELECT CAST(value_low AS TEXT), CAST(value_high AS TEXT), system, code, unit \
             FROM search_quantity \
             WHERE resource_type = 'Observation' AND id = 'o1' AND param = 'value-quantity'",
        )
        .await;
    assert_eq!(
        quantities,
        [texts(&[
            "71.5",
            "72.5",
            "http://unitsofmeasure.org",
            "/min",
            "beats/minute"
        ])]
    );
    // Index dates compare with the store's own instants.
    let earlier = direct
        .texts(
            "SELECT d.id FROM search_date d JOIN current_resources c \
             ON c.resource_type = d.resource_type AND c.id = d.id \
             WHERE d.param = 'date' AND d.high <= c.last_updated",
        )
        .await;
    assert_eq!(earlier, [texts(&["o1"])]);
}

async fn an_update_replaces_the_index_rows_and_a_delete_removes_them(world: World) {
    create(&world, "Patient", "p1", patient("Alpha")).await;
    let before = {
        let mut direct = Direct::open(&world).await;
        index_row_count(&mut direct, "Patient", "p1").await
    };
    update(&world, "Patient", "p1", patient("Beta")).await;
    let mut direct = Direct::open(&world).await;
    assert_eq!(
        family_rows(&mut direct, "p1").await,
        [texts(&["beta", "Beta"])]
    );
    assert_eq!(index_row_count(&mut direct, "Patient", "p1").await, before);
    create(
        &world,
        "Observation",
        "o1",
        observation("Patient/p1", "1", 1),
    )
    .await;
    update(
        &world,
        "Observation",
        "o1",
        observation("Patient/p2", "2", 2),
    )
    .await;
    let codes = direct
        .texts(
            "SELECT code FROM search_token \
             WHERE resource_type = 'Observation' AND id = 'o1' AND param = 'code'",
        )
        .await;
    assert_eq!(codes, [texts(&["2"])]);

    delete(&world, "Patient", "p1").await;
    assert_eq!(index_row_count(&mut direct, "Patient", "p1").await, 0);
    assert!(index_row_count(&mut direct, "Observation", "o1").await > 0);
    // Recreated after the delete, it is indexed again.
    update(&world, "Patient", "p1", patient("Gamma")).await;
    assert_eq!(
        family_rows(&mut direct, "p1").await,
        [texts(&["gamma", "Gamma"])]
    );
}

async fn a_dropped_transaction_leaves_no_index_rows(world: World) {
    create(&world, "Patient", "kept", patient("Kept")).await;
    {
        let mut tx = world.store.begin().await.unwrap();
        tx.create("Patient", "dropped", patient("Dropped"))
            .await
            .unwrap();
        tx.update("Patient", "kept", patient("Changed"), None)
            .await
            .unwrap();
    }
    let mut direct = Direct::open(&world).await;
    assert_eq!(index_row_count(&mut direct, "Patient", "dropped").await, 0);
    assert_eq!(
        family_rows(&mut direct, "kept").await,
        [texts(&["kept", "Kept"])]
    );
}

async fn connect_backfills_an_index_written_before_it_existed(world: World) {
    create(&world, "Patient", "p1", patient("Ödön")).await;
    create(
        &world,
        "Observation",
        "o1",
        observation("Patient/p1", "8867-4", 72),
    )
    .await;
    create(&world, "Patient", "gone", patient("Gone")).await;
    delete(&world, "Patient", "gone").await;
    let mut direct = Direct::open(&world).await;
    let before = (
        index_row_count(&mut direct, "Patient", "p1").await,
        index_row_count(&mut direct, "Observation", "o1").await,
    );
    assert!(before.0 > 0 && before.1 > 0);
    // As a database written before the index: no rows and no recorded version.
    direct
        .must(
            "DELETE FROM search_string; DELETE FROM search_token; \
             DELETE FROM search_token_of_type; DELETE FROM search_reference; \
             DELETE FROM search_date; DELETE FROM search_number; \
             DELETE FROM search_quantity; DELETE FROM search_uri; \
             DELETE FROM search_composite; DELETE FROM search_compartment; \
             UPDATE search_index_state SET version = 0;",
        )
        .await;
    assert_eq!(index_row_count(&mut direct, "Patient", "p1").await, 0);

    let reopened = haven_store::connect(&world.url, world.clock.clone())
        .await
        .expect("reconnect");
    let after = (
        index_row_count(&mut direct, "Patient", "p1").await,
        index_row_count(&mut direct, "Observation", "o1").await,
    );
    assert_eq!(after, before);
    assert_eq!(
        family_rows(&mut direct, "p1").await,
        [texts(&["odon", "Ödön"])]
    );
    assert_eq!(index_row_count(&mut direct, "Patient", "gone").await, 0);
    assert_eq!(
        direct
            .texts("SELECT CAST(version AS TEXT) FROM search_index_state")
            .await,
        [texts(&["3"])]
    );
    // A second connect finds the index current and leaves the rows as they are.
    drop(reopened);
    let _again = haven_store::connect(&world.url, world.clock.clone())
        .await
        .expect("reconnect again");
    assert_eq!(
        (
            index_row_count(&mut direct, "Patient", "p1").await,
            index_row_count(&mut direct, "Observation", "o1").await,
        ),
        before
    );
}

async fn two_stores_connecting_at_once_backfill_once(world: World) {
    for i in 0..30 {
        create(&world, "Patient", &format!("p{i}"), patient("Ånge")).await;
    }
    let mut direct = Direct::open(&world).await;
    let before = index_row_count(&mut direct, "Patient", "p7").await;
    direct
        .must("DELETE FROM search_string; UPDATE search_index_state SET version = 0;")
        .await;
    let (first, second) = tokio::join!(
        haven_store::connect(&world.url, world.clock.clone()),
        haven_store::connect(&world.url, world.clock.clone()),
    );
    first.expect("first connect");
    second.expect("second connect");
    assert_eq!(index_row_count(&mut direct, "Patient", "p7").await, before);
    let families = direct
        .texts("SELECT id FROM search_string WHERE param = 'family'")
        .await;
    assert_eq!(families.len(), 30, "one row per patient, none twice");
}

// --- Search criteria against real resources ---------------------------------------

/// A search of one type for one criterion.
fn query_of(resource_type: &str, criterion: Criterion) -> SearchQuery {
    let mut query = search(Some(resource_type));
    query.criterion = criterion;
    query
}

/// The ids a search finds, sorted, so a set can be compared.
async fn found_ids(world: &World, query: &SearchQuery) -> Vec<String> {
    let mut found = ids(&world.store.search(query).await.unwrap());
    found.sort();
    found
}

/// Asserts that a search of one type finds exactly `expected` (in any order).
async fn finds(world: &World, resource_type: &str, criterion: Criterion, expected: &[&str]) {
    let label = format!("{criterion:?}");
    let found = found_ids(world, &query_of(resource_type, criterion)).await;
    let mut expected: Vec<String> = expected.iter().map(|id| (*id).to_owned()).collect();
    expected.sort();
    assert_eq!(found, expected, "{label}");
}

/// The `(type, id)` of every match, sorted.
async fn found_keys(world: &World, query: &SearchQuery) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = world
        .store
        .search(query)
        .await
        .unwrap()
        .resources
        .into_iter()
        .map(|r| (r.resource_type, r.id))
        .collect();
    found.sort();
    found
}

fn keys(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(t, id)| ((*t).to_owned(), (*id).to_owned()))
        .collect()
}

fn string(param: &str, value: &str, how: StringMatch) -> Criterion {
    // As the API passes them: normalized for the default and `:contains`.
    let value = match how {
        StringMatch::Exact => value.to_owned(),
        _ => normalize_string(value),
    };
    Criterion::String {
        param: param.into(),
        value,
        how,
    }
}

fn coded(param: &str, system: Option<&str>, code: Option<&str>) -> Criterion {
    Criterion::Token {
        param: param.into(),
        system: system.map(str::to_owned),
        code: code.map(str::to_owned),
    }
}

fn not(criterion: Criterion) -> Criterion {
    Criterion::Not(Box::new(criterion))
}

fn reference(
    param: &str,
    target: (Option<&str>, Option<&str>),
    url: Option<&str>,
    version: Option<&str>,
) -> Criterion {
    Criterion::Reference {
        param: param.into(),
        target_type: target.0.map(str::to_owned),
        target_id: target.1.map(str::to_owned),
        url: url.map(str::to_owned),
        version: version.map(str::to_owned),
    }
}

/// A date search value as the API makes it: the interval its precision covers.
fn date_value(prefix: Prefix, text: &str) -> Range<OffsetDateTime> {
    let (low, high) = date_range(text).expect(text);
    Range {
        prefix,
        low,
        high,
        value: low,
    }
}

/// A number search value as the API makes it; `ap` widens to a tenth of the
/// value on each side.
fn number_value(prefix: Prefix, text: &str) -> Range<f64> {
    let (low, high) = decimal_range(text).expect(text);
    let value: f64 = text.parse().unwrap();
    let (low, high) = if prefix == Prefix::Ap {
        let tenth = value.abs() / 10.0;
        (low.min(value - tenth), high.max(value + tenth))
    } else {
        (low, high)
    };
    Range {
        prefix,
        low,
        high,
        value,
    }
}

fn quantity(range: Range<f64>, system: Option<&str>, code: Option<&str>) -> Criterion {
    Criterion::Quantity {
        param: "value-quantity".into(),
        range,
        system: system.map(str::to_owned),
        code: code.map(str::to_owned),
    }
}

fn uri(value: &str, how: UriMatch) -> Criterion {
    Criterion::Uri {
        param: "url".into(),
        uri: value.into(),
        how,
    }
}

/// An access rule from a table of types; every other type gets `otherwise`.
#[derive(Debug)]
struct Rule {
    types: Vec<(&'static str, TypeAccess)>,
    otherwise: TypeAccess,
}

impl AccessRule for Rule {
    fn for_type(&self, resource_type: &str) -> TypeAccess {
        self.types
            .iter()
            .find(|(name, _)| *name == resource_type)
            .map_or_else(|| self.otherwise.clone(), |(_, access)| access.clone())
    }
}

fn rule(types: Vec<(&'static str, TypeAccess)>) -> Access {
    Arc::new(Rule {
        types,
        otherwise: TypeAccess::Nothing,
    })
}

const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

/// An Observation of `subject` with a coded `code` and nothing else.
fn coded_observation(subject: &str, code: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": subject}
    })
}

/// An Observation with the given `value[x]` quantity, as written.
fn quantity_observation(value_quantity: Value) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
        "valueQuantity": value_quantity
    })
}

async fn string_search_folds_case_and_accents_exact_is_as_written_and_wildcards_are_literal(
    world: World,
) {
    create(
        &world,
        "Patient",
        "odon",
        json!({"resourceType": "Patient", "name": [{"family": "Ödön", "given": ["Béla"]}]}),
    )
    .await;
    create(&world, "Patient", "odd", patient("Odd")).await;
    create(&world, "Patient", "percent", patient("Per%cent")).await;
    create(&world, "Patient", "perfect", patient("Perfect")).await;
    create(&world, "Patient", "under", patient("Un_der")).await;
    create(&world, "Patient", "undone", patient("Undone")).await;

    use StringMatch::{Contains, Exact, StartsWith};
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        // Any case, any accents, any part of the name.
        (string("name", "ÖD", StartsWith), vec!["odd", "odon"]),
        (string("name", "od", StartsWith), vec!["odd", "odon"]),
        (string("family", "ödö", StartsWith), vec!["odon"]),
        (string("name", "BEL", StartsWith), vec!["odon"]),
        (string("given", "béla", StartsWith), vec!["odon"]),
        (string("name", "don", StartsWith), vec![]),
        // Exact: only as written, whole.
        (string("family", "Ödön", Exact), vec!["odon"]),
        (string("family", "odon", Exact), vec![]),
        (string("family", "ÖDÖN", Exact), vec![]),
        (string("family", "Ödö", Exact), vec![]),
        (string("given", "Béla", Exact), vec!["odon"]),
        // Contains: inner text, folded.
        (string("name", "ÉL", Contains), vec!["odon"]),
        (string("name", "do", Contains), vec!["odon", "undone"]),
        (string("family", "dd", Contains), vec!["odd"]),
        // `%` and `_` are themselves, not LIKE wildcards.
        (string("family", "Per%", StartsWith), vec!["percent"]),
        (string("family", "%", Contains), vec!["percent"]),
        (string("family", "r%c", Contains), vec!["percent"]),
        (string("family", "Un_", StartsWith), vec!["under"]),
        (string("family", "_", Contains), vec!["under"]),
        (string("family", "n_d", Contains), vec!["under"]),
        (string("family", "Per%cent", Exact), vec!["percent"]),
        (string("family", "Un_der", Exact), vec!["under"]),
        (string("family", "Un%", Exact), vec![]),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Patient", criterion, &expected).await;
    }
}

async fn token_search_matches_every_system_and_code_form_negation_text_and_identifier_type(
    world: World,
) {
    let with_code =
        |code: Value| json!({"resourceType": "Observation", "status": "final", "code": code});
    create(
        &world,
        "Observation",
        "loinc",
        with_code(
            json!({"coding": [{"system": LOINC, "code": "1234-5", "display": "Heart rate"}]}),
        ),
    )
    .await;
    create(
        &world,
        "Observation",
        "bare",
        with_code(json!({"coding": [{"code": "1234-5"}]})),
    )
    .await;
    create(
        &world,
        "Observation",
        "snomed",
        with_code(json!({"coding": [{"system": "http://snomed.info/sct", "code": "1234-5"}]})),
    )
    .await;
    create(
        &world,
        "Observation",
        "textonly",
        with_code(json!({"text": "Blood pressure panel"})),
    )
    .await;
    create(
        &world,
        "Observation",
        "nocode",
        json!({"resourceType": "Observation", "status": "final"}),
    )
    .await;

    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        // system|code
        (coded("code", Some(LOINC), Some("1234-5")), vec!["loinc"]),
        // |code: no system at all
        (coded("code", Some(""), Some("1234-5")), vec!["bare"]),
        // system|: any code of the system
        (coded("code", Some(LOINC), None), vec!["loinc"]),
        // code: any system, or none
        (
            coded("code", None, Some("1234-5")),
            vec!["bare", "loinc", "snomed"],
        ),
        (coded("code", Some(LOINC), Some("9999-9")), vec![]),
        // Codes compare as written.
        (coded("code", None, Some("1234-5 ")), vec![]),
        // :not also finds resources without the element.
        (
            not(coded("code", Some(LOINC), Some("1234-5"))),
            vec!["bare", "nocode", "snomed", "textonly"],
        ),
        (
            not(coded("code", None, Some("1234-5"))),
            vec!["nocode", "textonly"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Observation", criterion, &expected).await;
    }
    let text = |text: &str| Criterion::TokenText {
        param: "code".into(),
        text: normalize_string(text),
    };
    for (wanted, expected) in [
        ("Heart", vec!["loinc"]),
        ("heart rate", vec!["loinc"]),
        ("rate", vec!["loinc"]),
        ("PRESSURE", vec!["textonly"]),
        ("panel", vec!["textonly"]),
        ("blood pressure p", vec!["textonly"]),
        ("ressure", vec![]),
        ("%", vec![]),
    ] {
        finds(&world, "Observation", text(wanted), &expected).await;
    }

    let typed = |id_type: &str, text: Option<&str>, system: &str| {
        let mut kind = json!({"coding": [{"system": V2_0203, "code": id_type}]});
        if let Some(text) = text {
            kind["text"] = json!(text);
        }
        with_identifiers(
            patient("Typed"),
            json!([{"type": kind, "system": system, "value": "12345"}]),
        )
    };
    create(
        &world,
        "Patient",
        "mrn",
        typed("MR", Some("Medical record number"), "urn:mrn"),
    )
    .await;
    create(&world, "Patient", "ssn", typed("SS", None, "urn:ssn")).await;
    create(&world, "Patient", "untyped", patient("Untyped")).await;
    let of_type = |system: &str, code: &str, value: &str| Criterion::TokenOfType {
        param: "identifier".into(),
        type_system: system.into(),
        type_code: code.into(),
        value: value.into(),
    };
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        (of_type(V2_0203, "MR", "12345"), vec!["mrn"]),
        (of_type(V2_0203, "SS", "12345"), vec!["ssn"]),
        (of_type(V2_0203, "MR", "99999"), vec![]),
        (of_type("http://other.org", "MR", "12345"), vec![]),
        (of_type(V2_0203, "MR", "urn:mrn"), vec![]),
        (coded("identifier", None, Some("12345")), vec!["mrn", "ssn"]),
        (
            Criterion::TokenText {
                param: "identifier".into(),
                text: normalize_string("Medical"),
            },
            vec!["mrn"],
        ),
        (
            not(coded("identifier", Some("urn:mrn"), None)),
            vec!["ssn", "untyped"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Patient", criterion, &expected).await;
    }
}

async fn reference_search_matches_type_and_id_id_alone_absolute_urls_and_canonical_versions(
    world: World,
) {
    let subject = |reference: &str| json!({"resourceType": "Observation", "status": "final", "subject": {"reference": reference}});
    create(&world, "Observation", "relative", subject("Patient/a")).await;
    create(
        &world,
        "Observation",
        "versioned",
        subject("Patient/a/_history/2"),
    )
    .await;
    create(&world, "Observation", "group", subject("Group/a")).await;
    create(&world, "Observation", "other", subject("Patient/b")).await;
    create(
        &world,
        "Observation",
        "absolute",
        subject("http://elsewhere.example/fhir/Patient/remote"),
    )
    .await;
    create(
        &world,
        "Observation",
        "urn",
        subject("urn:uuid:6c7f0e1e-2a8e-4d6b-9c3a-1f1f1f1f1f1f"),
    )
    .await;
    create(
        &world,
        "Observation",
        "nosubject",
        json!({"resourceType": "Observation", "status": "final"}),
    )
    .await;

    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        (
            reference("subject", (Some("Patient"), Some("a")), None, None),
            vec!["relative", "versioned"],
        ),
        (
            reference("subject", (None, Some("a")), None, None),
            vec!["group", "relative", "versioned"],
        ),
        (
            reference("subject", (Some("Group"), Some("a")), None, None),
            vec!["group"],
        ),
        (
            reference("subject", (Some("Patient"), Some("a")), None, Some("2")),
            vec!["versioned"],
        ),
        // Another server's `Patient/remote` is not a patient of this one.
        (
            reference("subject", (Some("Patient"), None), None, None),
            vec!["other", "relative", "versioned"],
        ),
        (
            reference(
                "subject",
                (None, None),
                Some("http://elsewhere.example/fhir/Patient/remote"),
                None,
            ),
            vec!["absolute"],
        ),
        (
            reference(
                "subject",
                (None, None),
                Some("urn:uuid:6c7f0e1e-2a8e-4d6b-9c3a-1f1f1f1f1f1f"),
                None,
            ),
            vec!["urn"],
        ),
        // A relative reference has no URL to match.
        (
            reference("subject", (None, None), Some("Patient/a"), None),
            vec![],
        ),
        (
            reference("subject", (Some("Patient"), Some("c")), None, None),
            vec![],
        ),
        (
            not(reference(
                "subject",
                (Some("Patient"), Some("a")),
                None,
                None,
            )),
            vec!["absolute", "group", "nosubject", "other", "urn"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Observation", criterion, &expected).await;
    }

    // Stored as an absolute URL under this server's base, a reference is local.
    create(
        &world,
        "Observation",
        "local-absolute",
        subject("https://haven.test/fhir/Patient/a"),
    )
    .await;
    let mut local = query_of(
        "Observation",
        reference("subject", (Some("Patient"), Some("a")), None, None),
    );
    assert_eq!(
        found_ids(&world, &local).await,
        ["relative", "versioned"],
        "without the base, only relative references are local"
    );
    local.local_base = Some("https://haven.test/fhir/".into());
    assert_eq!(
        found_ids(&world, &local).await,
        ["local-absolute", "relative", "versioned"]
    );

    let response = |questionnaire: &str| {
        json!({"resourceType": "QuestionnaireResponse", "status": "completed",
               "questionnaire": questionnaire})
    };
    let intake = "http://example.org/Questionnaire/intake";
    create(
        &world,
        "QuestionnaireResponse",
        "v2",
        response(&format!("{intake}|2.0")),
    )
    .await;
    create(
        &world,
        "QuestionnaireResponse",
        "v3",
        response(&format!("{intake}|3.0")),
    )
    .await;
    create(
        &world,
        "QuestionnaireResponse",
        "unversioned",
        response(intake),
    )
    .await;
    create(
        &world,
        "QuestionnaireResponse",
        "otherv2",
        response("http://example.org/Questionnaire/other|2.0"),
    )
    .await;
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        (
            reference("questionnaire", (None, None), Some(intake), Some("2.0")),
            vec!["v2"],
        ),
        (
            reference("questionnaire", (None, None), Some(intake), None),
            vec!["unversioned", "v2", "v3"],
        ),
        (
            reference("questionnaire", (None, None), Some(intake), Some("4.0")),
            vec![],
        ),
        (
            reference("questionnaire", (None, None), None, Some("2.0")),
            vec!["otherv2", "v2"],
        ),
        (
            reference(
                "questionnaire",
                (None, None),
                Some(&format!("{intake}|2.0")),
                None,
            ),
            vec![],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "QuestionnaireResponse", criterion, &expected).await;
    }
}

async fn date_search_honours_every_prefix_on_days_seconds_zones_and_periods(world: World) {
    let effective = |key: &str, value: Value| {
        let mut observation = json!({"resourceType": "Observation", "status": "final"});
        observation[key] = value;
        observation
    };
    for (id, at) in [
        ("before", "2021-03-03"),
        ("day", "2021-03-04"),
        ("second", "2021-03-04T10:00:00Z"),
        // 23:30 on the 4th in UTC.
        ("zoned", "2021-03-05T01:30:00+02:00"),
        ("after", "2021-03-05T12:30:00Z"),
    ] {
        create(
            &world,
            "Observation",
            id,
            effective("effectiveDateTime", json!(at)),
        )
        .await;
    }
    create(
        &world,
        "Observation",
        "closed",
        effective(
            "effectivePeriod",
            json!({"start": "2021-03-01", "end": "2021-03-10"}),
        ),
    )
    .await;
    create(
        &world,
        "Observation",
        "open",
        effective("effectivePeriod", json!({"start": "2021-03-08"})),
    )
    .await;
    create(
        &world,
        "Observation",
        "undated",
        json!({"resourceType": "Observation", "status": "final"}),
    )
    .await;

    let date = |range| Criterion::Date {
        param: "date".into(),
        range,
    };
    // A day: [2021-03-04, 2021-03-05).
    let day_cases: Vec<(Prefix, Vec<&str>)> = vec![
        (Prefix::Eq, vec!["day", "second", "zoned"]),
        (Prefix::Ne, vec!["after", "before", "closed", "open"]),
        (Prefix::Gt, vec!["after", "closed", "open"]),
        (Prefix::Lt, vec!["before", "closed"]),
        (
            Prefix::Ge,
            vec!["after", "closed", "day", "open", "second", "zoned"],
        ),
        (
            Prefix::Le,
            vec!["before", "closed", "day", "second", "zoned"],
        ),
        (Prefix::Sa, vec!["after", "open"]),
        (Prefix::Eb, vec!["before"]),
        (Prefix::Ap, vec!["closed", "day", "second", "zoned"]),
    ];
    for (prefix, expected) in day_cases {
        finds(
            &world,
            "Observation",
            date(date_value(prefix, "2021-03-04")),
            &expected,
        )
        .await;
    }
    // A second: [10:00:00, 10:00:01) on the 4th; the day is not within it.
    let second_cases: Vec<(Prefix, Vec<&str>)> = vec![
        (Prefix::Eq, vec!["second"]),
        (
            Prefix::Ne,
            vec!["after", "before", "closed", "day", "open", "zoned"],
        ),
        (Prefix::Gt, vec!["after", "closed", "day", "open", "zoned"]),
        (Prefix::Lt, vec!["before", "closed", "day"]),
        (
            Prefix::Ge,
            vec!["after", "closed", "day", "open", "second", "zoned"],
        ),
        (Prefix::Le, vec!["before", "closed", "day", "second"]),
        (Prefix::Sa, vec!["after", "open", "zoned"]),
        (Prefix::Eb, vec!["before"]),
    ];
    for (prefix, expected) in second_cases {
        finds(
            &world,
            "Observation",
            date(date_value(prefix, "2021-03-04T10:00:00Z")),
            &expected,
        )
        .await;
    }
    // `ap` as the API widens it: an interval around the value.
    let around = Range {
        prefix: Prefix::Ap,
        low: datetime!(2021-03-04 09:00 UTC),
        high: datetime!(2021-03-04 11:00 UTC),
        value: datetime!(2021-03-04 10:00 UTC),
    };
    finds(
        &world,
        "Observation",
        date(around),
        &["closed", "day", "second"],
    )
    .await;
    // A month contains the closed period but not the open one.
    finds(
        &world,
        "Observation",
        date(date_value(Prefix::Eq, "2021-03")),
        &["after", "before", "closed", "day", "second", "zoned"],
    )
    .await;
    finds(
        &world,
        "Observation",
        date(date_value(Prefix::Ne, "2021-03")),
        &["open"],
    )
    .await;
    // The open end reaches far into the future.
    finds(
        &world,
        "Observation",
        date(date_value(Prefix::Gt, "2900")),
        &["open"],
    )
    .await;
    // Two conditions on one parameter: a range.
    finds(
        &world,
        "Observation",
        Criterion::All(vec![
            date(date_value(Prefix::Ge, "2021-03-04")),
            date(date_value(Prefix::Lt, "2021-03-05")),
        ]),
        &["closed", "day", "second", "zoned"],
    )
    .await;
}

async fn number_and_quantity_search_compare_midpoints_with_precision_units_and_rounding(
    world: World,
) {
    for (id, probability) in [
        ("p025", json!(0.25)),
        ("p03", json!(0.3)),
        ("p035", json!(0.35)),
        ("p04", json!(0.4)),
    ] {
        create(
            &world,
            "RiskAssessment",
            id,
            json!({"resourceType": "RiskAssessment", "status": "final",
                   "subject": {"reference": "Patient/a"},
                   "prediction": [{"probabilityDecimal": probability}]}),
        )
        .await;
    }
    create(
        &world,
        "RiskAssessment",
        "none",
        json!({"resourceType": "RiskAssessment", "status": "final",
               "subject": {"reference": "Patient/a"}}),
    )
    .await;
    let probability = |prefix, text| Criterion::Number {
        param: "probability".into(),
        range: number_value(prefix, text),
    };
    let cases: Vec<(Prefix, &str, Vec<&str>)> = vec![
        // 0.3 covers [0.25, 0.35).
        (Prefix::Eq, "0.3", vec!["p025", "p03"]),
        (Prefix::Ne, "0.3", vec!["p035", "p04"]),
        (Prefix::Gt, "0.3", vec!["p035", "p04"]),
        (Prefix::Lt, "0.3", vec!["p025"]),
        (Prefix::Ge, "0.3", vec!["p03", "p035", "p04"]),
        (Prefix::Le, "0.3", vec!["p025", "p03"]),
        (Prefix::Sa, "0.3", vec!["p035", "p04"]),
        (Prefix::Eb, "0.3", vec!["p025"]),
        (Prefix::Ap, "0.3", vec!["p025", "p03"]),
        // 0.4 covers [0.35, 0.45), though 0.4 - 0.05 is 0.35000000000000003 in f64.
        (Prefix::Eq, "0.4", vec!["p035", "p04"]),
        (Prefix::Eq, "0.35", vec!["p035"]),
        (Prefix::Eq, "0.30", vec!["p03"]),
        (Prefix::Gt, "0.25", vec!["p03", "p035", "p04"]),
        (Prefix::Le, "0.25", vec!["p025"]),
        (Prefix::Ge, "0.4", vec!["p04"]),
        (Prefix::Lt, "0.4", vec!["p025", "p03", "p035"]),
        (Prefix::Eq, "0.1", vec![]),
    ];
    for (prefix, text, expected) in cases {
        finds(
            &world,
            "RiskAssessment",
            probability(prefix, text),
            &expected,
        )
        .await;
    }

    let mg = |value: Value| json!({"value": value, "unit": "mg", "system": UCUM, "code": "mg"});
    create(
        &world,
        "Observation",
        "q100",
        quantity_observation(mg(json!(100))),
    )
    .await;
    create(
        &world,
        "Observation",
        "q99.7",
        quantity_observation(mg(json!(99.7))),
    )
    .await;
    create(
        &world,
        "Observation",
        "q101",
        quantity_observation(mg(json!(101))),
    )
    .await;
    create(
        &world,
        "Observation",
        "pound",
        quantity_observation(
            json!({"value": 100, "unit": "lb", "system": UCUM, "code": "[lb_av]"}),
        ),
    )
    .await;
    create(
        &world,
        "Observation",
        "unitonly",
        quantity_observation(json!({"value": 100, "unit": "mg"})),
    )
    .await;
    create(
        &world,
        "Observation",
        "novalue",
        json!({"resourceType": "Observation", "status": "final"}),
    )
    .await;
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        // `100` covers [99.5, 100.5): 99.7 is 100 at that precision.
        (
            quantity(number_value(Prefix::Eq, "100"), None, None),
            vec!["pound", "q100", "q99.7", "unitonly"],
        ),
        (
            quantity(number_value(Prefix::Eq, "100"), Some(UCUM), Some("mg")),
            vec!["q100", "q99.7"],
        ),
        // A code without a system matches the code or the unit.
        (
            quantity(number_value(Prefix::Eq, "100"), None, Some("mg")),
            vec!["q100", "q99.7", "unitonly"],
        ),
        (
            quantity(number_value(Prefix::Eq, "100"), Some(""), Some("mg")),
            vec!["q100", "q99.7", "unitonly"],
        ),
        (
            quantity(number_value(Prefix::Eq, "100"), None, Some("[lb_av]")),
            vec!["pound"],
        ),
        (
            quantity(number_value(Prefix::Eq, "100"), None, Some("lb")),
            vec!["pound"],
        ),
        // A system and code match the code, never the unit.
        (
            quantity(number_value(Prefix::Eq, "100"), Some(UCUM), Some("lb")),
            vec![],
        ),
        (
            quantity(number_value(Prefix::Eq, "100"), Some(UCUM), None),
            vec!["pound", "q100", "q99.7"],
        ),
        (
            quantity(
                number_value(Prefix::Eq, "100"),
                Some("http://example.org/units"),
                Some("mg"),
            ),
            vec![],
        ),
        (
            quantity(number_value(Prefix::Eq, "99.7"), None, None),
            vec!["q99.7"],
        ),
        (
            quantity(number_value(Prefix::Eq, "100.0"), Some(UCUM), Some("mg")),
            vec!["q100"],
        ),
        (
            quantity(number_value(Prefix::Gt, "100"), Some(UCUM), Some("mg")),
            vec!["q101"],
        ),
        (
            quantity(number_value(Prefix::Lt, "100"), Some(UCUM), Some("mg")),
            vec!["q99.7"],
        ),
        (
            quantity(number_value(Prefix::Ge, "100"), Some(UCUM), Some("mg")),
            vec!["q100", "q101"],
        ),
        (
            quantity(number_value(Prefix::Le, "100"), Some(UCUM), Some("mg")),
            vec!["q100", "q99.7"],
        ),
        (
            quantity(number_value(Prefix::Ne, "100"), Some(UCUM), Some("mg")),
            vec!["q101"],
        ),
        (
            quantity(number_value(Prefix::Gt, "99.7"), None, Some("mg")),
            vec!["q100", "q101", "unitonly"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Observation", criterion, &expected).await;
    }
}

async fn uri_search_matches_exactly_below_and_above(world: World) {
    for (id, url) in [
        ("vs123", Some("http://acme.org/fhir/ValueSet/123")),
        ("vs124", Some("http://acme.org/fhir/ValueSet/124")),
        ("other", Some("http://acme.org/other/ValueSet/1")),
        ("base", Some("http://acme.org/fhir")),
        ("nourl", None),
    ] {
        let mut value_set = json!({"resourceType": "ValueSet", "status": "active"});
        if let Some(url) = url {
            value_set["url"] = json!(url);
        }
        create(&world, "ValueSet", id, value_set).await;
    }
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        (
            uri("http://acme.org/fhir/ValueSet/123", UriMatch::Exact),
            vec!["vs123"],
        ),
        (
            uri("http://acme.org/fhir/ValueSet", UriMatch::Exact),
            vec![],
        ),
        (
            uri("HTTP://ACME.ORG/fhir/ValueSet/123", UriMatch::Exact),
            vec![],
        ),
        (
            uri("http://acme.org/fhir", UriMatch::Below),
            vec!["base", "vs123", "vs124"],
        ),
        (
            uri("http://acme.org/fhir/ValueSet/", UriMatch::Below),
            vec!["vs123", "vs124"],
        ),
        (
            uri("http://acme.org/", UriMatch::Below),
            vec!["base", "other", "vs123", "vs124"],
        ),
        (
            uri(
                "http://acme.org/fhir/ValueSet/123/_history/5",
                UriMatch::Above,
            ),
            vec!["base", "vs123"],
        ),
        (
            uri("http://acme.org/other/ValueSet/1", UriMatch::Above),
            vec!["other"],
        ),
        (uri("http://acme.org", UriMatch::Above), vec![]),
        (
            not(uri("http://acme.org/fhir/ValueSet/123", UriMatch::Exact)),
            vec!["base", "nourl", "other", "vs124"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "ValueSet", criterion, &expected).await;
    }
}

async fn missing_finds_resources_with_and_without_a_value(world: World) {
    create(
        &world,
        "Observation",
        "valued",
        observation("Patient/p", "8867-4", 72),
    )
    .await;
    create(
        &world,
        "Observation",
        "stringvalue",
        json!({"resourceType": "Observation", "status": "final", "valueString": "high"}),
    )
    .await;
    create(
        &world,
        "Observation",
        "bare",
        json!({"resourceType": "Observation", "status": "final"}),
    )
    .await;
    create(&world, "Patient", "p", patient("P")).await;
    let missing = |param: &str, kind, missing| Criterion::Missing {
        param: param.into(),
        kind,
        missing,
    };
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        (
            missing("value-quantity", IndexKind::Quantity, true),
            vec!["bare", "stringvalue"],
        ),
        (
            missing("value-quantity", IndexKind::Quantity, false),
            vec!["valued"],
        ),
        (
            missing("subject", IndexKind::Reference, true),
            vec!["bare", "stringvalue"],
        ),
        (missing("date", IndexKind::Date, false), vec!["valued"]),
        (
            missing("code", IndexKind::Token, true),
            vec!["bare", "stringvalue"],
        ),
        (
            missing("code-value-quantity", IndexKind::Composite, false),
            vec!["valued"],
        ),
        (
            missing("value-string", IndexKind::String, false),
            vec!["stringvalue"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Observation", criterion, &expected).await;
    }
    // Across types, each resource is asked about its own rows.
    let mut system = search(None);
    system.criterion = missing("value-quantity", IndexKind::Quantity, false);
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[("Observation", "valued")])
    );
    system.criterion = missing("value-quantity", IndexKind::Quantity, true);
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[
            ("Observation", "bare"),
            ("Observation", "stringvalue"),
            ("Patient", "p")
        ])
    );
}

async fn a_composite_matches_parts_of_one_combination_in_order(world: World) {
    let heart = |value: i64| observation("Patient/p", "8867-4", value);
    create(&world, "Observation", "heart72", heart(72)).await;
    create(&world, "Observation", "heart80", heart(80)).await;
    create(
        &world,
        "Observation",
        "systolic72",
        observation("Patient/p", "8480-6", 72),
    )
    .await;
    // Blood pressure as components: systolic 120, diastolic 80.
    let component = |code: &str, value: i64| {
        json!({"code": {"coding": [{"system": LOINC, "code": code}]},
               "valueQuantity": {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}})
    };
    create(
        &world,
        "Observation",
        "pressure",
        json!({"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
               "component": [component("8480-6", 120), component("8462-4", 80)]}),
    )
    .await;

    let composite = |param: &str, parts: (&str, &str), code: &str, range| Criterion::Composite {
        param: param.into(),
        parts: vec![
            coded(parts.0, Some(LOINC), Some(code)),
            Criterion::Quantity {
                param: parts.1.into(),
                range,
                system: None,
                code: None,
            },
        ],
    };
    let plain = |code, range| {
        composite(
            "code-value-quantity",
            ("code", "value-quantity"),
            code,
            range,
        )
    };
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        (
            plain("8867-4", number_value(Prefix::Eq, "72")),
            vec!["heart72"],
        ),
        (
            plain("8867-4", number_value(Prefix::Gt, "75")),
            vec!["heart80"],
        ),
        (
            plain("8480-6", number_value(Prefix::Eq, "72")),
            vec!["systolic72"],
        ),
        (plain("8480-6", number_value(Prefix::Eq, "80")), vec![]),
        (
            Criterion::Any(vec![
                plain("8867-4", number_value(Prefix::Eq, "80")),
                plain("8480-6", number_value(Prefix::Eq, "72")),
            ]),
            vec!["heart80", "systolic72"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Observation", criterion, &expected).await;
    }
    // Each component is its own combination: systolic 80 is no match, though
    // the resource has a systolic component and a component of 80.
    let parts = ("component-code", "component-value-quantity");
    let by_component = |code, range| composite("component-code-value-quantity", parts, code, range);
    let cases: Vec<(Criterion, Vec<&str>)> = vec![
        (
            by_component("8480-6", number_value(Prefix::Eq, "120")),
            vec!["pressure"],
        ),
        (
            by_component("8462-4", number_value(Prefix::Lt, "90")),
            vec!["pressure"],
        ),
        (
            by_component("8480-6", number_value(Prefix::Eq, "80")),
            vec![],
        ),
        (
            by_component("8462-4", number_value(Prefix::Eq, "120")),
            vec![],
        ),
        (
            Criterion::All(vec![
                by_component("8480-6", number_value(Prefix::Ge, "120")),
                by_component("8462-4", number_value(Prefix::Ge, "80")),
            ]),
            vec!["pressure"],
        ),
    ];
    for (criterion, expected) in cases {
        finds(&world, "Observation", criterion, &expected).await;
    }
    // The parts are read in the definition's order: swapped, nothing matches.
    finds(
        &world,
        "Observation",
        Criterion::Composite {
            param: "code-value-quantity".into(),
            parts: vec![
                quantity(number_value(Prefix::Eq, "72"), None, None),
                coded("code", Some(LOINC), Some("8867-4")),
            ],
        },
        &[],
    )
    .await;
}

async fn the_patient_compartment_holds_the_patient_and_what_refers_to_it(world: World) {
    create(&world, "Patient", "a", patient("A")).await;
    create(&world, "Patient", "b", patient("B")).await;
    create(
        &world,
        "Observation",
        "oa",
        observation("Patient/a", "8867-4", 70),
    )
    .await;
    create(
        &world,
        "Observation",
        "ob",
        observation("Patient/b", "8867-4", 70),
    )
    .await;
    create(
        &world,
        "Observation",
        "ogroup",
        observation("Group/a", "8867-4", 70),
    )
    .await;
    create(
        &world,
        "Encounter",
        "ea",
        json!({"resourceType": "Encounter", "status": "finished",
               "class": {"code": "AMB"}, "subject": {"reference": "Patient/a"}}),
    )
    .await;
    let of_a = || Criterion::PatientCompartment("a".into());
    finds(&world, "Observation", of_a(), &["oa"]).await;
    finds(&world, "Patient", of_a(), &["a"]).await;
    finds(&world, "Encounter", of_a(), &["ea"]).await;
    let mut system = search(None);
    system.criterion = of_a();
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[("Encounter", "ea"), ("Observation", "oa"), ("Patient", "a")])
    );
    system.criterion = Criterion::PatientCompartment("b".into());
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[("Observation", "ob"), ("Patient", "b")])
    );
    system.criterion = Criterion::PatientCompartment("nobody".into());
    assert!(found_keys(&world, &system).await.is_empty());
    // Moving the observation to b moves it between compartments.
    update(
        &world,
        "Observation",
        "oa",
        observation("Patient/b", "8867-4", 70),
    )
    .await;
    finds(&world, "Observation", of_a(), &[]).await;
    finds(
        &world,
        "Observation",
        Criterion::PatientCompartment("b".into()),
        &["oa", "ob"],
    )
    .await;
}

async fn chains_and_has_follow_references_and_the_access_applies_inside_them(world: World) {
    create(&world, "Patient", "a", patient("Smith")).await;
    create(&world, "Patient", "b", patient("Jones")).await;
    create(&world, "Patient", "gone", patient("Smith")).await;
    delete(&world, "Patient", "gone").await;
    create(
        &world,
        "Observation",
        "ax",
        coded_observation("Patient/a", "1111-1"),
    )
    .await;
    create(
        &world,
        "Observation",
        "ay",
        coded_observation("Patient/a", "2222-2"),
    )
    .await;
    create(
        &world,
        "Observation",
        "bx",
        coded_observation("Patient/b", "1111-1"),
    )
    .await;
    create(
        &world,
        "Observation",
        "gonex",
        coded_observation("Patient/gone", "1111-1"),
    )
    .await;

    let subject_named = |name: &str| Criterion::Chain {
        param: "subject".into(),
        targets: vec![(
            "Patient".into(),
            string("name", name, StringMatch::StartsWith),
        )],
    };
    finds(&world, "Observation", subject_named("smith"), &["ax", "ay"]).await;
    finds(&world, "Observation", subject_named("jones"), &["bx"]).await;
    finds(&world, "Observation", subject_named("nobody"), &[]).await;
    finds(
        &world,
        "Observation",
        Criterion::All(vec![
            subject_named("smith"),
            coded("code", None, Some("1111-1")),
        ]),
        &["ax"],
    )
    .await;

    // The access is inside the chain: targets the caller may not see match nothing.
    let access_all_observations = |patients| {
        rule(vec![
            ("Observation", TypeAccess::All),
            ("Patient", patients),
        ])
    };
    let mut chained = query_of("Observation", subject_named("smith"));
    chained.total = true;
    chained.access = Some(access_all_observations(TypeAccess::Nothing));
    let page = world.store.search(&chained).await.unwrap();
    assert_eq!((ids(&page), page.total), (vec![], Some(0)));
    chained.access = Some(access_all_observations(TypeAccess::Only(Criterion::Id(
        vec!["b".into()],
    ))));
    assert!(found_ids(&world, &chained).await.is_empty());
    chained.criterion = subject_named("jones");
    assert_eq!(found_ids(&world, &chained).await, ["bx"]);
    chained.access = Some(access_all_observations(TypeAccess::All));
    assert_eq!(found_ids(&world, &chained).await, ["bx"]);

    // `_has`: patients with an observation of a code.
    let has_code = |code: &str| Criterion::Has {
        source_type: "Observation".into(),
        param: "subject".into(),
        criterion: Box::new(coded("code", Some(LOINC), Some(code))),
    };
    finds(&world, "Patient", has_code("1111-1"), &["a", "b"]).await;
    finds(&world, "Patient", has_code("2222-2"), &["a"]).await;
    finds(&world, "Patient", has_code("3333-3"), &[]).await;
    finds(&world, "Patient", not(has_code("2222-2")), &["b"]).await;
    let mut system = search(None);
    system.criterion = has_code("2222-2");
    assert_eq!(found_keys(&world, &system).await, keys(&[("Patient", "a")]));

    // The access on the source type applies to the observations `_has` reads.
    let mut has = query_of("Patient", has_code("1111-1"));
    has.access = Some(rule(vec![
        ("Patient", TypeAccess::All),
        ("Observation", TypeAccess::Nothing),
    ]));
    assert!(found_ids(&world, &has).await.is_empty());
    has.access = Some(rule(vec![
        ("Patient", TypeAccess::All),
        (
            "Observation",
            TypeAccess::Only(Criterion::PatientCompartment("b".into())),
        ),
    ]));
    assert_eq!(found_ids(&world, &has).await, ["b"]);
    has.criterion = has_code("2222-2");
    assert!(found_ids(&world, &has).await.is_empty());
    system.access = has.access.clone();
    assert!(found_keys(&world, &system).await.is_empty());
}

async fn access_rules_confine_counts_pages_system_searches_and_combine(world: World) {
    create(&world, "Patient", "a", patient("A")).await;
    create(&world, "Patient", "b", patient("B")).await;
    for (id, subject) in [
        ("a1", "Patient/a"),
        ("a2", "Patient/a"),
        ("a3", "Patient/a"),
        ("b1", "Patient/b"),
        ("b2", "Patient/b"),
    ] {
        create(
            &world,
            "Observation",
            id,
            observation(subject, "8867-4", 70),
        )
        .await;
    }
    create(
        &world,
        "Encounter",
        "ea",
        json!({"resourceType": "Encounter", "status": "finished",
               "class": {"code": "AMB"}, "subject": {"reference": "Patient/a"}}),
    )
    .await;
    let only_a = || TypeAccess::Only(Criterion::PatientCompartment("a".into()));
    let by_id = vec![SortKey {
        by: SortBy::Id,
        descending: false,
    }];

    // Counted and paged within what the rule admits.
    let mut query = search(Some("Observation"));
    query.access = Some(rule(vec![("Observation", only_a())]));
    query.sort = by_id.clone();
    query.count = 2;
    query.total = true;
    let first = world.store.search(&query).await.unwrap();
    assert_eq!(
        (ids(&first), first.total, first.more),
        (vec!["a1".to_owned(), "a2".to_owned()], Some(3), true)
    );
    query.offset = 2;
    let second = world.store.search(&query).await.unwrap();
    assert_eq!(
        (ids(&second), second.total, second.more),
        (vec!["a3".to_owned()], Some(3), false)
    );
    query.count = 0;
    query.offset = 0;
    assert_eq!(world.store.search(&query).await.unwrap().total, Some(3));
    assert_eq!(
        world.store.search_keys(&query, 100).await.unwrap(),
        keys(&[
            ("Observation", "a1"),
            ("Observation", "a2"),
            ("Observation", "a3")
        ])
    );
    // A criterion and the rule must both hold.
    let mut narrowed = search(Some("Observation"));
    narrowed.access = query.access.clone();
    narrowed.criterion = Criterion::Id(vec!["a2".into(), "b1".into()]);
    assert_eq!(found_ids(&world, &narrowed).await, ["a2"]);

    // A system search admits only the types the rule allows.
    let mut system = search(None);
    system.total = true;
    system.access = Some(rule(vec![
        ("Observation", only_a()),
        ("Patient", TypeAccess::All),
    ]));
    let page = world.store.search(&system).await.unwrap();
    assert_eq!(page.total, Some(5));
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[
            ("Observation", "a1"),
            ("Observation", "a2"),
            ("Observation", "a3"),
            ("Patient", "a"),
            ("Patient", "b")
        ])
    );
    let mut two_types = system.clone();
    two_types.types = vec!["Observation".into(), "Encounter".into()];
    assert_eq!(
        found_keys(&world, &two_types).await,
        keys(&[
            ("Observation", "a1"),
            ("Observation", "a2"),
            ("Observation", "a3")
        ])
    );
    let mut nothing = search(Some("Encounter"));
    nothing.total = true;
    nothing.access = system.access.clone();
    let page = world.store.search(&nothing).await.unwrap();
    assert_eq!((page.resources.len(), page.total), (0, Some(0)));

    // Both rules must admit: Only and Only is their AND, Nothing wins, All yields.
    let first_rule = rule(vec![
        ("Observation", only_a()),
        ("Patient", TypeAccess::All),
        ("Encounter", TypeAccess::All),
    ]);
    let second_rule = rule(vec![
        (
            "Observation",
            TypeAccess::Only(Criterion::Id(vec!["a1".into(), "b1".into()])),
        ),
        ("Patient", TypeAccess::Nothing),
        ("Encounter", TypeAccess::All),
    ]);
    let mut both = search(None);
    both.total = true;
    both.access = Some(Arc::new(BothAccess(first_rule.clone(), second_rule)));
    let page = world.store.search(&both).await.unwrap();
    assert_eq!(page.total, Some(2));
    assert_eq!(
        found_keys(&world, &both).await,
        keys(&[("Encounter", "ea"), ("Observation", "a1")])
    );
    let everything: Access = Arc::new(Rule {
        types: vec![],
        otherwise: TypeAccess::All,
    });
    both.access = Some(Arc::new(BothAccess(everything, first_rule)));
    assert_eq!(world.store.search(&both).await.unwrap().total, Some(6));
}

async fn sorting_is_total_the_same_on_every_backend_and_search_keys_pages_alike(world: World) {
    for (id, family, birth) in [
        ("Z", Some("Zed"), Some("1990-01-01")),
        ("ad", Some("adams"), Some("1980")),
        ("od", Some("Ödön"), Some("1985-06")),
        ("Ba", Some("Baker"), None),
        ("lu", Some("Łukasz"), Some("2000-02-29")),
        ("none", None, Some("1970-05-05")),
        ("s1", Some("Smith"), Some("1990-07-01")),
        ("s2", Some("Smith"), Some("1980-03-03")),
    ] {
        let mut resource = json!({"resourceType": "Patient"});
        if let Some(family) = family {
            resource["name"] = json!([{"family": family}]);
        }
        if let Some(birth) = birth {
            resource["birthDate"] = json!(birth);
        }
        world.tick();
        create(&world, "Patient", id, resource).await;
    }
    let by = |param: &str, kind, descending| SortKey {
        by: SortBy::Param {
            param: param.into(),
            kind,
        },
        descending,
    };
    let id = |descending| SortKey {
        by: SortBy::Id,
        descending,
    };
    let cases: Vec<(Vec<SortKey>, Vec<&str>)> = vec![
        // Folded names, compared bytewise (ł after z); ties by id; no name last.
        (
            vec![by("family", IndexKind::String, false)],
            vec!["ad", "Ba", "od", "s1", "s2", "Z", "lu", "none"],
        ),
        (
            vec![by("family", IndexKind::String, true)],
            vec!["lu", "Z", "s1", "s2", "od", "Ba", "ad", "none"],
        ),
        // Dates: ascending by where they start, descending by where they end.
        (
            vec![by("birthdate", IndexKind::Date, true)],
            vec!["lu", "s1", "Z", "od", "ad", "s2", "none", "Ba"],
        ),
        (
            vec![by("birthdate", IndexKind::Date, false)],
            vec!["none", "ad", "s2", "od", "Z", "s1", "lu", "Ba"],
        ),
        // Ids bytewise: upper case first.
        (
            vec![id(false)],
            vec!["Ba", "Z", "ad", "lu", "none", "od", "s1", "s2"],
        ),
        (
            vec![id(true)],
            vec!["s2", "s1", "od", "none", "lu", "ad", "Z", "Ba"],
        ),
        // Several keys: the second orders what the first leaves tied.
        (
            vec![
                by("family", IndexKind::String, false),
                by("birthdate", IndexKind::Date, false),
            ],
            vec!["ad", "Ba", "od", "s2", "s1", "Z", "lu", "none"],
        ),
        (
            vec![by("family", IndexKind::String, true), id(true)],
            vec!["lu", "Z", "s2", "s1", "od", "Ba", "ad", "none"],
        ),
        (
            vec![
                SortKey {
                    by: SortBy::LastUpdated,
                    descending: true,
                },
                id(false),
            ],
            vec!["s2", "s1", "none", "lu", "Ba", "od", "ad", "Z"],
        ),
    ];
    for (sort, expected) in cases {
        let mut query = search(Some("Patient"));
        query.sort = sort.clone();
        assert_eq!(
            ids(&world.store.search(&query).await.unwrap()),
            expected,
            "{sort:?}"
        );
        // Paging through gives the same order, without gaps or repeats.
        query.count = 3;
        let mut paged = Vec::new();
        loop {
            let page = world.store.search(&query).await.unwrap();
            paged.extend(ids(&page));
            if !page.more {
                break;
            }
            query.offset += 3;
        }
        assert_eq!(paged, expected, "paged {sort:?}");
        let keyed: Vec<String> = world
            .store
            .search_keys(&query, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        assert_eq!(keyed, expected, "keys {sort:?}");
        let first_five = world.store.search_keys(&query, 5).await.unwrap();
        assert_eq!(first_five.len(), 5, "limited keys {sort:?}");
        assert_eq!(first_five[4].1, expected[4], "limited keys {sort:?}");
    }

    // Across types, resources without the value come last, by type and id.
    create(
        &world,
        "Observation",
        "o1",
        observation("Patient/ad", "8867-4", 60),
    )
    .await;
    let mut system = search(None);
    system.criterion = Criterion::Id(vec!["ad".into(), "none".into(), "o1".into(), "Z".into()]);
    system.sort = vec![by("family", IndexKind::String, false)];
    let page = world.store.search(&system).await.unwrap();
    let order: Vec<(String, String)> = page
        .resources
        .into_iter()
        .map(|r| (r.resource_type, r.id))
        .collect();
    assert_eq!(
        order,
        keys(&[
            ("Patient", "ad"),
            ("Patient", "Z"),
            ("Observation", "o1"),
            ("Patient", "none")
        ])
    );
    assert_eq!(world.store.search_keys(&system, 10).await.unwrap(), order);

    // Quantities sort by value.
    system.types = vec!["Observation".into()];
    system.criterion = Criterion::Always;
    create(
        &world,
        "Observation",
        "o2",
        observation("Patient/ad", "8867-4", 50),
    )
    .await;
    create(
        &world,
        "Observation",
        "o3",
        observation("Patient/ad", "8867-4", 55),
    )
    .await;
    system.sort = vec![by("value-quantity", IndexKind::Quantity, false)];
    assert_eq!(
        ids(&world.store.search(&system).await.unwrap()),
        ["o2", "o3", "o1"]
    );
    system.sort = vec![by("value-quantity", IndexKind::Quantity, true)];
    assert_eq!(
        ids(&world.store.search(&system).await.unwrap()),
        ["o1", "o3", "o2"]
    );
}

async fn a_keys_criterion_returns_exactly_the_named_resources(world: World) {
    create(&world, "Patient", "a", patient("A")).await;
    create(&world, "Patient", "b", patient("B")).await;
    create(
        &world,
        "Observation",
        "a",
        observation("Patient/a", "8867-4", 70),
    )
    .await;
    create(
        &world,
        "Observation",
        "o1",
        observation("Patient/a", "8867-4", 70),
    )
    .await;
    create(&world, "Patient", "gone", patient("Gone")).await;
    delete(&world, "Patient", "gone").await;
    let named = |pairs: &[(&str, &str)]| Criterion::Keys(keys(pairs));
    let mut system = search(None);
    system.criterion = named(&[
        ("Patient", "a"),
        ("Observation", "o1"),
        ("Patient", "missing"),
        ("Patient", "gone"),
    ]);
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[("Observation", "o1"), ("Patient", "a")])
    );
    // The type is part of the key: Observation/a is not Patient/a.
    system.criterion = named(&[("Observation", "a")]);
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[("Observation", "a")])
    );
    system.criterion = named(&[]);
    assert!(found_keys(&world, &system).await.is_empty());
    finds(
        &world,
        "Patient",
        named(&[("Patient", "a"), ("Observation", "o1")]),
        &["a"],
    )
    .await;
    finds(
        &world,
        "Patient",
        named(&[("Patient", "b"), ("Patient", "a")]),
        &["a", "b"],
    )
    .await;
}

async fn criteria_nested_too_deeply_are_too_complex_and_composites_of_non_values_unsupported(
    world: World,
) {
    create(&world, "Patient", "a", patient("A")).await;
    let nested = |depth: usize| {
        let mut criterion = Criterion::Always;
        for _ in 0..depth {
            criterion = not(criterion);
        }
        criterion
    };
    // Moderate nesting is fine.
    finds(&world, "Patient", nested(4), &["a"]).await;
    let unsupported = |result: Result<_, StoreError>| {
        assert!(
            matches!(result, Err(StoreError::Unsupported(_))),
            "{result:?}"
        );
    };
    // Too deep is the client's to narrow: too complex, not unsupported.
    let too_complex = |result: Result<_, StoreError>| {
        assert!(
            matches!(result, Err(StoreError::TooComplex(_))),
            "{result:?}"
        );
    };
    let mut deep = query_of("Patient", nested(40));
    too_complex(world.store.search(&deep).await.map(|_| ()));
    deep.total = true;
    too_complex(world.store.search(&deep).await.map(|_| ()));
    too_complex(world.store.search_keys(&deep, 10).await.map(|_| ()));
    // Nesting inside an access rule counts as well.
    let mut through_access = search(Some("Patient"));
    through_access.access = Some(rule(vec![("Patient", TypeAccess::Only(nested(40)))]));
    too_complex(world.store.search(&through_access).await.map(|_| ()));
    // Chains nest too.
    let mut chain = string("name", "a", StringMatch::StartsWith);
    for _ in 0..20 {
        chain = Criterion::Chain {
            param: "link".into(),
            targets: vec![("Patient".into(), chain)],
        };
    }
    too_complex(
        world
            .store
            .search(&query_of("Patient", chain))
            .await
            .map(|_| ()),
    );

    for part in [
        not(coded("code", Some(LOINC), Some("8867-4"))),
        Criterion::Missing {
            param: "code".into(),
            kind: IndexKind::Token,
            missing: false,
        },
        Criterion::PatientCompartment("a".into()),
        Criterion::Any(vec![coded("code", Some(LOINC), Some("8867-4"))]),
    ] {
        let composite = Criterion::Composite {
            param: "code-value-quantity".into(),
            parts: vec![part, quantity(number_value(Prefix::Eq, "72"), None, None)],
        };
        unsupported(
            world
                .store
                .search(&query_of("Observation", composite))
                .await
                .map(|_| ()),
        );
    }
    // Sorting by a composite has no meaning.
    let mut sorted = search(Some("Observation"));
    sorted.sort = vec![SortKey {
        by: SortBy::Param {
            param: "code-value-quantity".into(),
            kind: IndexKind::Composite,
        },
        descending: false,
    }];
    unsupported(world.store.search(&sorted).await.map(|_| ()));
}

async fn a_chain_to_several_target_types_stays_on_its_own_parameter_and_resource(world: World) {
    create(&world, "Patient", "a", patient("Smith")).await;
    create(&world, "Patient", "b", patient("Jones")).await;
    create(
        &world,
        "Group",
        "g",
        json!({"resourceType": "Group", "type": "person", "actual": true}),
    )
    .await;
    create(
        &world,
        "Observation",
        "of-a",
        coded_observation("Patient/a", "1111-1"),
    )
    .await;
    create(
        &world,
        "Observation",
        "of-group",
        coded_observation("Group/g", "1111-1"),
    )
    .await;
    // Jones's observation, performed by Smith: Smith is no subject of it.
    let mut performed = coded_observation("Patient/b", "1111-1");
    performed["performer"] = json!([{"reference": "Patient/a"}]);
    create(&world, "Observation", "performed", performed).await;
    // An Encounter of Smith's with the id of an observation of Jones's.
    create(
        &world,
        "Observation",
        "twin",
        coded_observation("Patient/b", "1111-1"),
    )
    .await;
    create(
        &world,
        "Encounter",
        "twin",
        json!({"resourceType": "Encounter", "status": "finished",
               "class": {"code": "AMB"}, "subject": {"reference": "Patient/a"}}),
    )
    .await;

    // `subject.name=smith` without a type: every target type of the parameter.
    let chain = || Criterion::Chain {
        param: "subject".into(),
        targets: vec![
            ("Group".into(), Criterion::Id(vec!["g".into()])),
            (
                "Patient".into(),
                string("name", "smith", StringMatch::StartsWith),
            ),
        ],
    };
    finds(&world, "Observation", chain(), &["of-a", "of-group"]).await;
    let mut system = search(None);
    system.criterion = chain();
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[
            ("Encounter", "twin"),
            ("Observation", "of-a"),
            ("Observation", "of-group")
        ])
    );
}

async fn token_outside_and_compartment_outside_find_labels_and_patients_beyond_a_list(
    world: World,
) {
    let act = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
    let labeled = |subject: &str, codes: &[&str]| {
        let mut o = observation(subject, "8867-4", 70);
        o["meta"] = json!({"security": codes.iter()
            .map(|c| json!({"system": act, "code": c})).collect::<Vec<_>>()});
        o
    };
    create(&world, "Patient", "a", patient("A")).await;
    create(&world, "Patient", "b", patient("B")).await;
    create(
        &world,
        "Observation",
        "plain",
        observation("Patient/a", "8867-4", 70),
    )
    .await;
    create(&world, "Observation", "eth", labeled("Patient/a", &["ETH"])).await;
    create(&world, "Observation", "psy", labeled("Patient/b", &["PSY"])).await;
    create(
        &world,
        "Observation",
        "both",
        labeled("Patient/b", &["ETH", "PSY"]),
    )
    .await;
    let outside = |codes: &[&str]| Criterion::TokenOutside {
        param: "_security".into(),
        system: act.into(),
        codes: codes.iter().map(|c| (*c).to_owned()).collect(),
    };
    finds(&world, "Observation", outside(&[]), &["eth", "psy", "both"]).await;
    finds(&world, "Observation", outside(&["ETH"]), &["psy", "both"]).await;
    finds(&world, "Observation", outside(&["ETH", "PSY"]), &[]).await;
    finds(
        &world,
        "Observation",
        Criterion::Not(Box::new(outside(&["ETH"]))),
        &["plain", "eth"],
    )
    .await;
    let beyond =
        |ids: &[&str]| Criterion::CompartmentOutside(ids.iter().map(|c| (*c).to_owned()).collect());
    finds(&world, "Observation", beyond(&["a"]), &["psy", "both"]).await;
    finds(&world, "Observation", beyond(&["a", "b"]), &[]).await;
    finds(&world, "Patient", beyond(&["b"]), &["a"]).await;
    let mut system = search(None);
    system.criterion = beyond(&["b"]);
    assert_eq!(
        found_keys(&world, &system).await,
        keys(&[
            ("Observation", "eth"),
            ("Observation", "plain"),
            ("Patient", "a")
        ])
    );
}
