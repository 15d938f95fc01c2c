//! `/spool`: what each route's spool holds, and its dead letters (listed,
//! sent back for delivery, deleted). Same token rules as `/status`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Json, Response};
use serde_json::json;

use super::{AdminState, non_simple};
use crate::spool::{Spool, SpoolError};

/// Dead letters listed per page by default, and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn spools(state: &AdminState) -> Vec<Arc<Spool>> {
    state
        .shared
        .proxy
        .generation()
        .routes
        .iter()
        .filter_map(|r| r.protections.spool.clone())
        .collect()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// `GET /spool`: per route, requests waiting, bytes, the oldest's age, dead
/// letters.
pub(super) async fn summary(State(state): State<Arc<AdminState>>) -> Response {
    let routes: Vec<_> = spools(&state)
        .iter()
        .map(|s| {
            let mut doc = serde_json::to_value(s.store().snapshot()).unwrap_or_default();
            doc["route"] = s.route().into();
            doc
        })
        .collect();
    Json(json!({ "routes": routes })).into_response()
}

/// The value of `key` in the query of `uri`.
fn query<'a>(uri: &'a Uri, key: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// The spool `?route=` names, or the only one.
fn chosen(state: &AdminState, uri: &Uri) -> Result<Arc<Spool>, (StatusCode, String)> {
    let all = spools(state);
    match query(uri, "route") {
        Some(name) => all.into_iter().find(|s| s.route() == name).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no route `{name}` with a spool"),
            )
        }),
        None if all.len() == 1 => Ok(all.into_iter().next().expect("one")),
        None if all.is_empty() => Err((StatusCode::NOT_FOUND, "no route has a spool".into())),
        None => Err((
            StatusCode::BAD_REQUEST,
            "several routes have a spool: name one with ?route=".into(),
        )),
    }
}

/// `GET /spool/dead?route=&after=&limit=`: dead letters oldest first, a page
/// at a time (`next` is the `after` of the next page).
pub(super) async fn dead_letters(State(state): State<Arc<AdminState>>, uri: Uri) -> Response {
    let spool = match chosen(&state, &uri) {
        Ok(spool) => spool,
        Err((status, message)) => return error(status, message),
    };
    let limit = match query(&uri, "limit").map(str::parse::<usize>) {
        None => PAGE,
        Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("limit must be 1 to {MAX_PAGE}"),
            );
        }
    };
    let page = spool.store().dead_letters(query(&uri, "after"), limit);
    let next = (page.len() == limit).then(|| page.last().map(|d| d.id.clone()));
    Json(json!({"route": spool.route(), "dead": page, "next": next.flatten()})).into_response()
}

/// The spool holding dead letter `id`.
fn holding(state: &AdminState, id: &str) -> Option<Arc<Spool>> {
    spools(state).into_iter().find(|s| s.store().has_dead(id))
}

/// `POST /spool/dead/{id}/replay`: back into the spool, delivered like any
/// other (a JSON request, as `/reload`, so that no web page can send it).
pub(super) async fn resurrect(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !non_simple(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send it with `Content-Type: application/json`",
        );
    }
    let Some(spool) = holding(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("no dead letter `{id}`"));
    };
    match spool.store().resurrect(&id).await {
        Ok(true) => {
            Json(json!({"status": "requeued", "id": id, "route": spool.route()})).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no dead letter `{id}`")),
        Err(SpoolError::Full) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            "the spool is full; the dead letter stays",
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `DELETE /spool/dead/{id}`.
pub(super) async fn forget(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Response {
    let Some(spool) = holding(&state, &id) else {
        return error(StatusCode::NOT_FOUND, format!("no dead letter `{id}`"));
    };
    match spool.store().forget(&id).await {
        Ok(true) => Json(json!({"status": "deleted", "id": id})).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no dead letter `{id}`")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
