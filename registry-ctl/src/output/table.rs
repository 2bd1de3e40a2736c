//! Aligned text columns.

/// Rows of cells printed in aligned columns, two spaces apart, with
/// trailing blanks trimmed.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Header first, then the rows.
    rows: Vec<Vec<String>>,
    /// Written before every line.
    indent: String,
}

impl Table {
    /// A table with this header row.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Table {
            rows: vec![header.into_iter().map(Into::into).collect()],
            indent: String::new(),
        }
    }

    /// The same table, every line indented by `width` spaces.
    pub fn indented(mut self, width: usize) -> Self {
        self.indent = " ".repeat(width);
        self
    }

    /// Adds a row; missing cells are blank.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table as text, one line per row.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = self.indent.clone();
            for (cell, width) in row.iter().zip(&widths) {
                line.push_str(cell);
                line.push_str(&" ".repeat(width - cell.chars().count() + 2));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_and_lines_trimmed() {
        let mut table = Table::new(["A", "LONG HEADER", "C"]);
        table.row(["wide cell", "x", ""]);
        table.row(["é", "y", "z"]);
        assert_eq!(
            table.render(),
            concat!(
                "A          LONG HEADER  C\n",
                "wide cell  x\n",
                "é          y            z\n",
            )
        );
        assert_eq!(Table::new(["X"]).indented(2).render(), "  X\n");
    }
}
