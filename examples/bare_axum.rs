//! The benchmark's baseline: a bare axum server answering `GET /lookup/{id}` with the same
//! JSON a frontend's cached lookup returns, and nothing else. `bench/run.sh` compares the
//! frontend's cached lookup rate against it.

use axum::extract::Path;
use axum::http::header;
use axum::routing::get;

const BOOK: &str = r#"{"id":1,"title":"How to get a good grade in 677 in 20 minutes a day","topic":"distributed systems","price":29.99,"stock":100}"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let app = axum::Router::new().route(
        "/lookup/:id",
        get(|Path(_id): Path<String>| async { ([(header::CONTENT_TYPE, "application/json")], BOOK) }),
    );
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
