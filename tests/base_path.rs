//! `conch serve --base-path /conch`: every route, redirect, cookie and
//! asset under the prefix, nothing outside it (a real server, plain HTTP).

mod common;

use common::{Endpoint, start_server};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn everything_lives_under_the_base_path() {
    let server = start_server(&["--base-path", "/conch/"], &[]);
    let http = client();
    let get = |path: &str| http.get(server.url(path)).send();

    // Outside the base: nothing, not even the health check.
    for path in [
        "/",
        "/login",
        "/healthz",
        "/api/v1/agents",
        "/conchx/",
        "/static/app.css",
    ] {
        assert_eq!(get(path).await.unwrap().status(), 404, "{path}");
    }
    // Inside: the console sends a stranger to the login page under the base.
    for path in ["/conch", "/conch/"] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/conch/login");
    }
    assert_eq!(get("/conch/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/conch/static/app.css").await.unwrap().status(), 200);
    let login = get("/conch/login").await.unwrap().text().await.unwrap();
    assert!(login.contains(r#"action="/conch/login""#), "{login}");
    assert!(login.contains(r#"href="/conch/static/app.css""#));

    // Logging in: the cookie is the base path's, the redirect under it.
    let r = get(&format!("/conch/login?token={}", server.admin_token()))
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/conch/");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("Path=/conch;"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let page = http
        .get(server.url("/conch/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"data-base="/conch""#), "{page}");
    assert!(page.contains(r#"src="/conch/static/app.js""#));

    // The API under the base, and its description says so.
    let agents = http
        .get(server.url("/conch/api/v1/agents"))
        .bearer_auth(server.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(agents.status(), 200);
    let doc: serde_json::Value = get("/conch/api/v1/openapi.json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["servers"][0]["url"], "/conch");

    // `conch healthcheck` finds it there too.
    let status = std::process::Command::new(common::bin())
        .args([
            "healthcheck",
            "--listen",
            &server.addr.to_string(),
            "--base-path",
            "/conch",
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_base_path_that_is_not_a_plain_path_is_refused() {
    for bad in ["conch", "/con ch", "/a/../b", "/a//b", "/<x>"] {
        let out = std::process::Command::new(common::bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--base-path", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--base-path"), "{bad}: {err}");
    }
    // A public URL's path is the base path; a different --base-path is refused.
    let out = std::process::Command::new(common::bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--public-url",
            "https://ops.example.com/conch",
            "--base-path",
            "/other",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("differs"));
}

#[tokio::test]
async fn a_login_never_redirects_out_of_the_base_path() {
    let server = start_server(&["--base-path", "/conch"], &[]);
    let http = client();
    for next in ["/../other/x", "/%2e%2e/other", "/a/./b", "/x/%2E%2E/y"] {
        let url = format!(
            "/conch/login?token={}&next={}",
            server.admin_token(),
            url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
        );
        let r = http.get(server.url(&url)).send().await.unwrap();
        assert_eq!(r.status(), 303, "{next}");
        assert_eq!(r.headers()["location"], "/conch/", "{next}");
    }
}

#[tokio::test]
async fn of_two_session_cookies_only_the_live_one_counts() {
    // A sibling sub-domain can plant a same-named cookie for a longer path,
    // which the browser sends first: it must not shadow the real session.
    let server = start_server(&["--base-path", "/conch"], &[]);
    let http = client();
    let r = http
        .get(server.url(&format!("/conch/login?token={}", server.admin_token())))
        .send()
        .await
        .unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let real = set.split(';').next().unwrap().to_owned();
    let name = real.split('=').next().unwrap();
    let planted = format!("{name}=planted-by-a-sibling; {real}");
    let r = http
        .get(server.url("/conch/"))
        .header("cookie", planted)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the planted cookie shadowed the session");
}

#[test]
fn require_agent_refuses_to_start_an_embedded_agent() {
    let out = std::process::Command::new(common::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--require-agent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("embedded agent"));
}
