//! A small SQL builder: text plus bound values with the right placeholder for the backend.
//! Used where the ORM's query builder would hide the query (window functions, row-value
//! comparisons, label-selector subqueries); values are always bound, never spliced.

use drover_shared::labels::{LabelSelector, Requirement};
use sea_orm::sea_query::ArrayType;
use sea_orm::{DbBackend, Statement, Value};
use uuid::Uuid;

pub struct Sql {
    backend: DbBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    pub fn new(backend: DbBackend) -> Self {
        Self {
            backend,
            text: String::with_capacity(256),
            values: Vec::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        match self.backend {
            DbBackend::Postgres => {
                self.text.push('$');
                self.text.push_str(&self.values.len().to_string());
            }
            _ => self.text.push('?'),
        }
        self
    }

    /// Appends `(v1, v2, ...)` with every value bound.
    pub fn bind_list<V: Into<Value>>(&mut self, values: impl IntoIterator<Item = V>) -> &mut Self {
        self.push("(");
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(v);
        }
        self.push(")")
    }

    /// Appends a membership test of `column` in `ids`: one array parameter on PostgreSQL
    /// (`= ANY($n)`, cheap to plan however long), an `IN (...)` list on SQLite.
    pub fn in_ids(&mut self, column: &str, ids: &[Uuid]) -> &mut Self {
        self.push(column);
        match self.backend {
            DbBackend::Postgres => {
                self.push(" = ANY(");
                self.bind(Value::Array(
                    ArrayType::Uuid,
                    Some(Box::new(ids.iter().map(|id| Value::from(*id)).collect())),
                ));
                self.push(")")
            }
            _ => {
                self.push(" IN ");
                self.bind_list(ids.iter().copied())
            }
        }
    }

    /// Appends ` AND <condition>` for each requirement of a label selector, matching rows of
    /// `owner_column` against `label_table(owner_fk, key, value)`.
    pub fn label_selector(
        &mut self,
        selector: &LabelSelector,
        label_table: &str,
        owner_fk: &str,
        owner_column: &str,
    ) -> &mut Self {
        for req in &selector.requirements {
            let (negate, key, values) = match req {
                Requirement::In { key, values } => (false, key, Some(values)),
                Requirement::NotIn { key, values } => (true, key, Some(values)),
                Requirement::Exists { key } => (false, key, None),
                Requirement::DoesNotExist { key } => (true, key, None),
            };
            self.push(if negate {
                " AND NOT EXISTS ("
            } else {
                " AND EXISTS ("
            });
            self.push("SELECT 1 FROM ")
                .push(label_table)
                .push(" l WHERE l.")
                .push(owner_fk)
                .push(" = ")
                .push(owner_column)
                .push(" AND l.key = ");
            self.bind(key.clone());
            if let Some(values) = values {
                self.push(" AND l.value IN ");
                self.bind_list(values.iter().cloned());
            }
            self.push(")");
        }
        self
    }

    pub fn build(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}
