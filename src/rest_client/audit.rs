//! `conch audit`: the audit log through the REST API, as a table or as
//! JSON lines, paging through `next` until the count asked for.

use serde_json::Value;

use super::{ClientError, Server};

/// What `conch audit` asks for.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub agent: Option<String>,
    pub kind: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub text: Option<String>,
    /// Records to print at most.
    pub count: u32,
    pub json: bool,
}

/// Prints the records, newest first.
pub async fn print(server: &Server, q: &AuditQuery) -> Result<(), ClientError> {
    let client = server.client()?;
    let mut cursor: Option<i64> = None;
    let mut printed = 0u32;
    let mut rows = Vec::new();
    while printed < q.count {
        let mut params: Vec<(&str, String)> = Vec::new();
        let mut add = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                params.push((k, v));
            }
        };
        add("user", q.user.clone());
        add("agent", q.agent.clone());
        add("kind", q.kind.clone());
        add("since_ms", q.since_ms.map(|v| v.to_string()));
        add("until_ms", q.until_ms.map(|v| v.to_string()));
        add("text", q.text.clone());
        add("cursor", cursor.map(|v| v.to_string()));
        add("limit", Some((q.count - printed).min(1000).to_string()));
        let mut url = url::Url::parse(&server.url("/api/v1/audit"))
            .map_err(|e| ClientError::Broken(e.to_string()))?;
        url.query_pairs_mut().extend_pairs(&params);
        let page: Value = server
            .send(client.get(url))
            .await?
            .json()
            .await
            .map_err(|e| ClientError::Broken(e.to_string()))?;
        let records = page["records"].as_array().cloned().unwrap_or_default();
        for r in &records {
            if q.json {
                println!("{r}");
            } else {
                rows.push(row(r));
            }
            printed += 1;
        }
        cursor = page["next"].as_i64();
        if cursor.is_none() || records.is_empty() {
            break;
        }
    }
    if !q.json {
        print_table(&rows);
    }
    Ok(())
}

/// One record as table cells: time, kind, user, agent, source, details.
fn row(r: &Value) -> [String; 6] {
    let at = r["at_ms"].as_i64().unwrap_or(0);
    let when = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at.to_string());
    let text = |v: &Value| {
        v.as_str()
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
    };
    let detail: String = r["detail"]
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    [
        when,
        text(&r["kind"]),
        text(&r["user"]),
        text(&r["agent"]),
        text(&r["source"]),
        detail,
    ]
}

fn print_table(rows: &[[String; 6]]) {
    let head = ["TIME", "KIND", "USER", "AGENT", "SOURCE", "DETAIL"];
    let mut width = head.map(|h| h.chars().count());
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r.iter()).take(5) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i < 5 {
                out.push_str(&format!("{cell:<w$}  ", w = width[i]));
            } else {
                out.push_str(cell);
            }
        }
        println!("{}", out.trim_end());
    };
    line(head);
    for r in rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
}
