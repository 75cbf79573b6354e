//! A fresh PostgreSQL database per story, made from the admin URL in
//! `HAVEN_TEST_POSTGRES_URL` and dropped afterwards, also when the story fails.

use std::future::Future;

/// Runs `story` with the URL of a new database named `{prefix}_{uuid}`, then
/// drops the database. Does nothing (saying so) when
/// `HAVEN_TEST_POSTGRES_URL` is not set.
pub async fn with_fresh_database<F, Fut>(prefix: &str, story: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Ok(admin_url) = std::env::var("HAVEN_TEST_POSTGRES_URL") else {
        println!("not run: HAVEN_TEST_POSTGRES_URL is not set");
        return;
    };
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    admin(&admin_url, &format!("CREATE DATABASE {name}")).await;
    let url = database_url(&admin_url, &name);
    // Caught, so that the database is dropped whatever happens.
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        story(url).await;
    }))
    .await;
    admin(
        &admin_url,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure);
    }
}

/// Runs one statement on the admin database.
pub async fn admin(admin_url: &str, statement: &str) {
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
pub fn database_url(admin_url: &str, name: &str) -> String {
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
