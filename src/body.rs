//! The body type the proxy answers with, and small helpers around it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// The error type of every service in the stack, as in tower: nested error enums
/// would change whenever layers are reordered.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response or forwarded-request body: streamed, type-erased.
///
/// Boxing costs one small allocation per message; it lets upstream bodies, JSON
/// rejections and observed bodies share one type.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body that is one chunk of bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts to [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Walks an error's `source()` chain looking for a `T`.
pub(crate) fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}
