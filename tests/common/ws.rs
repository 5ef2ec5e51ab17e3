//! A console client over a real WebSocket, for the tests.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Endpoint, Server};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn open_ws(
    server: &Server,
    cookie: Option<&str>,
    origin: Option<&str>,
) -> Result<Ws, u16> {
    let mut req = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .unwrap();
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket: {e}"),
    }
}

pub async fn console(server: &Server) -> Ws {
    let cookie = server.admin_cookie().await;
    let mut ws = open_ws(server, Some(&cookie), Some(&server.origin()))
        .await
        .expect("upgrade");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "hello");
    ws
}

/// Sends a text message exactly as given.
pub async fn send_raw(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next text message as JSON, skipping agent status updates.
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("socket open").expect("frame") {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] != "agents" {
                    return v;
                }
            }
            Message::Binary(b) => panic!("unexpected output {:?}", String::from_utf8_lossy(&b)),
            _ => {}
        }
    }
}

/// Runs one command line; returns (stdout, stderr, exit message). Acks output.
pub async fn run(ws: &mut Ws, id: u32, cmd: &str) -> (Vec<u8>, Vec<u8>, Value) {
    send(ws, json!({"type": "exec", "id": id, "cmd": cmd})).await;
    collect(ws, id).await
}

pub async fn collect(ws: &mut Ws, id: u32) -> (Vec<u8>, Vec<u8>, Value) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match ws.next().await.expect("socket open").expect("frame") {
            Message::Binary(b) => {
                assert_eq!(u32::from_be_bytes([b[1], b[2], b[3], b[4]]), id);
                match b[0] {
                    1 => out.extend_from_slice(&b[5..]),
                    2 => err.extend_from_slice(&b[5..]),
                    other => panic!("stream tag {other}"),
                }
                send(ws, json!({"type": "ack", "id": id, "bytes": b.len() - 5})).await;
            }
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("exit") | Some("error") => return (out, err, v),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}
