//! `GET /`: the dashboard, and the chart library it loads from `/assets/`.
//!
//! The page holds no data itself, so it is served without the token; its
//! requests to `/status` and `/status/history` carry one when needed. The
//! chart library is vendored (`assets/README.md`) and embedded, so the page
//! works on an air-gapped admin port and needs no build step.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The vendored files, by the name the page asks for. The version is in the
/// name, so a browser may keep them for as long as it likes.
const ASSETS: [(&str, &str, &str); 2] = [
    (
        "uplot-1.6.32.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/uPlot.iife.min.js"),
    ),
    (
        "uplot-1.6.32.min.css",
        "text/css; charset=utf-8",
        include_str!("assets/uPlot.min.css"),
    ),
];

pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("dashboard.html"),
    )
}

pub(super) async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            *body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
