//! How answers are printed: the `--output` formats and the [`Printer`]
//! every command writes through.
//!
//! A command prints text for `table` and `wide` (built with
//! [`table::Table`] and the views in [`node`] and [`admin`]) and protobuf messages for
//! `json`: [`Printer::message`] takes any prost message that implements
//! [`json::ProtoMessage`] and writes its proto3 canonical JSON on one line.

pub mod admin;
pub mod json;
pub mod node;
pub mod placement;
pub mod table;

use std::io::Write;

use clap::ValueEnum;

use crate::error::CtlError;
use json::{JsonTranscoder, ProtoMessage};

/// The `--output` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns (or a description) for people.
    Table,
    /// `table` with more columns.
    Wide,
    /// Proto3 canonical JSON, one object per line.
    Json,
}

/// Writes a command's answer in the chosen format.
pub struct Printer<W: Write> {
    /// The format asked for.
    format: Format,
    /// Where the answer goes (stdout, or a buffer in tests).
    out: W,
    /// The transcoder, built on the first JSON message.
    json: Option<JsonTranscoder>,
}

impl<W: Write> Printer<W> {
    /// A printer of `format` onto `out`.
    pub fn new(format: Format, out: W) -> Self {
        Printer {
            format,
            out,
            json: None,
        }
    }

    /// The format asked for.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Writes `text` as it is.
    pub fn text(&mut self, text: &str) -> Result<(), CtlError> {
        self.out.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Writes `message` as proto3 JSON on one line.
    pub fn message<M: ProtoMessage>(&mut self, message: &M) -> Result<(), CtlError> {
        let json = match &mut self.json {
            Some(json) => json,
            None => self.json.insert(JsonTranscoder::new()?),
        };
        let line = json.to_line(message)?;
        writeln!(self.out, "{line}")?;
        Ok(())
    }

    /// Writes a JSON value that is no protobuf message (a command's own
    /// summary) on one line.
    pub fn value(&mut self, value: &serde_json::Value) -> Result<(), CtlError> {
        writeln!(self.out, "{value}")?;
        Ok(())
    }

    /// Flushes what was written so far (a watch prints as events come).
    pub fn flush(&mut self) -> Result<(), CtlError> {
        self.out.flush()?;
        Ok(())
    }

    /// Flushes the output.
    pub fn finish(mut self) -> Result<W, CtlError> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::node::tests::sample_node;

    #[test]
    fn json_is_one_object_per_line() {
        let mut printer = Printer::new(Format::Json, Vec::new());
        let mut second = sample_node();
        second.node_id = "gpu-node-2".into();
        printer.message(&sample_node()).unwrap();
        printer.message(&second).unwrap();
        printer
            .value(&serde_json::json!({"nodeId": "n", "status": "absent"}))
            .unwrap();
        let text = String::from_utf8(printer.finish().unwrap()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["nodeId"], "gpu-node-1");
        assert_eq!(lines[1]["nodeId"], "gpu-node-2");
        assert_eq!(lines[2]["status"], "absent");
    }

    #[test]
    fn text_is_written_as_it_is() {
        let mut printer = Printer::new(Format::Table, Vec::new());
        assert_eq!(printer.format(), Format::Table);
        printer.text("online\n").unwrap();
        assert_eq!(printer.finish().unwrap(), b"online\n");
    }
}
