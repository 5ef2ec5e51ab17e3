//! Browser assets, embedded in the binary so that it runs from any
//! directory: conch's own files from `static/`, the page's script as
//! bundled from `web/` into `web/dist/` (by `npm ci`, through the package's
//! `prepare` script), and xterm.js from the npm packages pinned in
//! `package-lock.json`.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "static/"]
struct Own;

#[derive(RustEmbed)]
#[folder = "web/dist/"]
struct Bundle;

#[derive(RustEmbed)]
#[folder = "node_modules/@xterm/xterm/"]
#[include = "lib/xterm.js"]
#[include = "css/xterm.css"]
struct Xterm;

#[derive(RustEmbed)]
#[folder = "node_modules/@xterm/addon-fit/"]
#[include = "lib/addon-fit.js"]
struct AddonFit;

fn lookup(path: &str) -> Option<rust_embed::EmbeddedFile> {
    match path {
        "vendor/xterm/xterm.js" => Xterm::get("lib/xterm.js"),
        "vendor/xterm/xterm.css" => Xterm::get("css/xterm.css"),
        "vendor/addon-fit/addon-fit.js" => AddonFit::get("lib/addon-fit.js"),
        _ if path.starts_with("vendor/") => None,
        other => Bundle::get(other).or_else(|| Own::get(other)),
    }
}

/// `GET /static/{*path}`: the file with its content type and an ETag;
/// browsers revalidate (`no-cache`) and get `304 Not Modified` when unchanged.
pub(crate) async fn serve(Path(path): Path<String>, headers: HeaderMap) -> Response {
    let Some(file) = lookup(&path) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    if not_modified(&headers, &etag) {
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag),
                (header::CACHE_CONTROL, "no-cache".into()),
            ],
        )
            .into_response();
    }
    let mime = mime_guess::from_path(&path).first_or_octet_stream();
    // Text assets say their charset: browsers must not guess.
    let content_type = match mime.type_() {
        mime_guess::mime::TEXT => format!("{}; charset=utf-8", mime.essence_str()),
        _ if mime.essence_str() == "application/javascript" => {
            "text/javascript; charset=utf-8".to_owned()
        }
        _ => mime.essence_str().to_owned(),
    };
    let mut response = file.data.into_owned().into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Whether `If-None-Match` names `etag` (a list, weak tags, or `*`: the
/// weak comparison of RFC 9110 section 13.1.2).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}
