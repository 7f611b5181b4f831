//! Static files: noVNC, spice-html5 and `web_root`.

use super::*;

pub(super) fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "ogg" | "oga" => "audio/ogg",
        "mp3" => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

/// Serves a file under `root`, refusing anything that would leave it.
pub(crate) async fn static_file(root: &Path, url_path: &str) -> Resp {
    let mut rel = PathBuf::new();
    for part in url_path.split('/').filter(|p| !p.is_empty()) {
        let c = Path::new(part).components().next();
        // Paths are not percent-decoded, so "%2e%2e" names a file and cannot climb.
        if part.contains('\\') || part.contains('\0') || !matches!(c, Some(Component::Normal(_))) {
            return text(StatusCode::BAD_REQUEST, "bad path\n");
        }
        // No dotfile or dot-directory (.git, .env, .htpasswd) is served.
        if part.starts_with('.') {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        rel.push(part);
    }
    let mut path = root.join(&rel);
    if url_path.ends_with('/') || rel.as_os_str().is_empty() {
        path.push("index.html");
    }
    let (Ok(real), Ok(real_root)) = (
        tokio::fs::canonicalize(&path).await,
        tokio::fs::canonicalize(root).await,
    ) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    // Nor through a symlink: what it resolves to must hold no dot component either.
    let hidden = real.strip_prefix(&real_root).map_or(true, |rel| {
        rel.components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    });
    if hidden {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match tokio::fs::read(&real).await {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type(&real)),
            );
            r
        }
        Err(_) => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
