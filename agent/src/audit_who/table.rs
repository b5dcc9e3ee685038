//! The receivers as a table for people.

use std::fmt::Write as _;

use super::Receiver;

/// The receivers as an aligned table, one line each.
pub fn table(receivers: &[Receiver]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 9]> = receivers
        .iter()
        .map(|r| {
            [
                r.first.clone(),
                r.last.clone(),
                r.requests.to_string(),
                format!("{}/{}", dash(&r.namespace), dash(&r.pod_name)),
                dash(&r.pod_uid),
                dash(&r.container),
                dash(&r.container_id),
                r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                dash(&r.comm),
            ]
        })
        .collect();
    let header = [
        "FIRST",
        "LAST",
        "REQUESTS",
        "NAMESPACE/POD",
        "POD UID",
        "CONTAINER",
        "CONTAINER ID",
        "PID",
        "COMM",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
