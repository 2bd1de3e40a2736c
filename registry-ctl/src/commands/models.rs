//! `models [MODEL]`: where each model is served or staged (ListModels).

use std::io::Write;

use registry_proto::pb;

use super::Context;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, placement};

/// Prints every model, or only `model` (table: one line per model, wide
/// adds its pools; JSON: the ListModelsResponse on one line). Exit 1 when
/// no model is listed.
pub async fn run<W: Write>(
    context: &Context,
    model: Option<&str>,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let request = pb::ListModelsRequest {
        model: model.unwrap_or_default().to_owned(),
    };
    let answer = context.query_registry().await?.list_models(request).await?;
    print(&answer, printer)?;
    if answer.models.is_empty() {
        match model {
            Some(model) => eprintln!("registry-ctl: model {model:?} is neither served nor staged"),
            None => eprintln!("registry-ctl: no model is served or staged"),
        }
    }
    Ok(Exit::from_answer(!answer.models.is_empty()))
}

fn print<W: Write>(
    answer: &pb::ListModelsResponse,
    printer: &mut Printer<W>,
) -> Result<(), CtlError> {
    match printer.format() {
        Format::Table => printer.text(&placement::model_table(answer, false)),
        Format::Wide => printer.text(&placement::model_table(answer, true)),
        Format::Json => printer.message(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::placement::tests::sample_models;

    #[test]
    fn each_format_prints_the_answer() {
        for (format, needle) in [
            (Format::Table, "STAGED ON"),
            (Format::Wide, "llama-3.1-8b:"),
            (Format::Json, "\"stagedOn\""),
        ] {
            let mut printer = Printer::new(format, Vec::new());
            print(&sample_models(), &mut printer).unwrap();
            let text = String::from_utf8(printer.finish().unwrap()).unwrap();
            assert!(
                text.contains(needle) && text.contains("qwen2.5-7b"),
                "{format:?}: {text}"
            );
        }
    }
}
