//! The live view on a terminal, drawn with `indicatif`: finished resources, failures and log
//! lines scroll by, and under them one line per running resource shows its address,
//! operation, elapsed time, a bar when the provider reports done/expected, and its phase or
//! latest message.
//!
//! indicatif draws into [`Screen`], which queues its bytes on the CLI's output thread like
//! every other write to stderr (so a slow terminal never slows the run), and every other
//! writer to stderr (`say!`, `tracing`) goes through [`MultiProgress::suspend`] while the view
//! is up (see `output::to_stderr`): the block is cleared, the line written, the block drawn
//! again below it.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capstan_engine::events::{Event, EventSink};
use capstan_schema::ProgressKind;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

use crate::render::HumanEvents;
use crate::style;

/// How often the view is redrawn (events in between are gathered: drawing on every event made
/// a run of 10,000 quick resources 2.5 times slower than without the view). A resource that
/// ends before the next redraw never gets a line of its own.
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// Lines gathered beyond this are printed at once rather than at the next tick.
const PENDING_LIMIT: usize = 256 * 1024;
/// At most this many running resources are drawn; the rest are counted.
const MAX_DRAWN: usize = 20;

/// The terminal indicatif draws on: stderr, through the output thread's queue. Its writes
/// never fail (a closed stderr drops them), so indicatif never sees an error.
#[derive(Debug)]
struct Screen;

/// The terminal's columns and rows (100 × 40 when it does not say).
fn terminal_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(std::io::stderr()) {
        Ok(size) if size.ws_col > 0 => {
            let rows = if size.ws_row > 0 { size.ws_row } else { 40 };
            (size.ws_col, rows)
        }
        _ => (100, 40),
    }
}

impl Screen {
    fn send(&self, text: String) -> std::io::Result<()> {
        crate::output::to_stderr_under_view(text.into_bytes());
        Ok(())
    }

    fn cursor(&self, n: usize, direction: char) -> std::io::Result<()> {
        if n > 0 {
            self.send(format!("\x1b[{n}{direction}"))?;
        }
        Ok(())
    }
}

impl TermLike for Screen {
    fn width(&self) -> u16 {
        terminal_size().0
    }

    fn height(&self) -> u16 {
        terminal_size().1
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'A')
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'B')
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'C')
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'D')
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.send(format!("{s}\n"))
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.send(s.to_string())
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.send("\r\x1b[2K".to_string())
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct LiveEvents {
    lines: HumanEvents,
    multi: MultiProgress,
    live: RefCell<Live>,
}

#[derive(Default)]
struct Live {
    running: BTreeMap<String, Running>,
    /// Running resources with no line yet, oldest first (some may have ended since).
    waiting: VecDeque<String>,
    /// How many running resources have a line.
    drawn: usize,
    /// The "… and N more running" line, while there are more.
    more: Option<ProgressBar>,
    /// Lines to print above the block at the next redraw.
    pending: String,
}

struct Running {
    operation: &'static str,
    started: Instant,
    status: String,
    counter: Option<(u64, u64, String)>,
    bar: Option<ProgressBar>,
}

/// The templates of a running resource's line: with no counter, with a counter that knows its
/// total (a bar), and with one that does not; bytes as bytes (`12.5 MiB/48 MiB`).
fn line_style(counter: Option<&(u64, u64, String)>) -> ProgressStyle {
    let template = match counter {
        None => "{spinner} {prefix} {elapsed:>4} {wide_msg}",
        Some((_, expected, unit)) if *expected > 0 && unit == "bytes" => {
            "{spinner} {prefix} {elapsed:>4} [{bar:20}] {bytes}/{total_bytes} {wide_msg}"
        }
        Some((_, expected, _)) if *expected > 0 => {
            "{spinner} {prefix} {elapsed:>4} [{bar:20}] {pos}/{len} {wide_msg}"
        }
        Some((_, _, unit)) if unit == "bytes" => {
            "{spinner} {prefix} {elapsed:>4} {bytes} {wide_msg}"
        }
        Some(_) => "{spinner} {prefix} {elapsed:>4} {pos} {wide_msg}",
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("█░")
}

impl LiveEvents {
    /// A live view, redrawn every 100 ms while anything runs or lines wait to be printed,
    /// and at once for the plan, an interrupt and the summary.
    pub fn new(lines: HumanEvents) -> Rc<Self> {
        // indicatif draws by itself at most once a second (a bar's update asks for a draw);
        // each redraw here draws the whole block once, after every line is brought up to date.
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(Screen), 1);
        let multi = MultiProgress::with_draw_target(target);
        crate::output::route_stderr_through(Some(multi.clone()));
        let view = Rc::new(LiveEvents {
            lines,
            multi,
            live: RefCell::new(Live::default()),
        });
        let weak = Rc::downgrade(&view);
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(REDRAW_EVERY);
            loop {
                tick.tick().await;
                let Some(view) = weak.upgrade() else { return };
                let busy = {
                    let live = view.live.borrow();
                    !live.running.is_empty() || !live.pending.is_empty()
                };
                // A terminal that does not keep up (paused with Ctrl-S, a slow link) gets no
                // more redraws to queue until it has taken the last one.
                if busy && !crate::output::stderr_backlog() {
                    view.redraw();
                }
            }
        });
        view
    }

    /// Prints the lines gathered since the last redraw above the block, gives lines to
    /// resources that have run since the last one, and brings every line up to date.
    fn redraw(&self) {
        let mut live = self.live.borrow_mut();
        // The block never reaches the top of the window (the cursor cannot move above it to
        // erase it again).
        let most = MAX_DRAWN.min(usize::from(terminal_size().1).saturating_sub(3));
        let live = &mut *live;
        while live.drawn < most {
            let Some(address) = live.waiting.pop_front() else {
                break;
            };
            let Some(r) = live.running.get_mut(&address).filter(|r| r.bar.is_none()) else {
                continue;
            };
            let prefix = self
                .lines
                .paint(style::CYAN, &format!("{address} {}", r.operation));
            let bar = ProgressBar::new_spinner()
                .with_style(line_style(r.counter.as_ref()))
                .with_prefix(prefix)
                .with_elapsed(r.started.elapsed());
            let bar = match &live.more {
                Some(more) => self.multi.insert_before(more, bar),
                None => self.multi.add(bar),
            };
            r.bar = Some(bar);
            live.drawn += 1;
        }
        for r in live.running.values() {
            if let Some(bar) = &r.bar {
                if let Some((done, expected, unit)) = &r.counter {
                    bar.set_length(*expected);
                    bar.set_position(*done);
                    bar.set_message(format!("{unit} {}", r.status));
                } else {
                    bar.set_message(r.status.clone());
                }
                bar.tick();
            }
        }
        let hidden = live.running.len() - live.drawn;
        match (&live.more, hidden) {
            (Some(more), 0) => {
                self.multi.remove(more);
                live.more = None;
            }
            (more, hidden) if hidden > 0 => {
                let text = self
                    .lines
                    .paint(style::DIM, &format!("  … and {hidden} more running"));
                match more {
                    Some(more) => more.set_message(text),
                    None => {
                        let more = ProgressBar::new_spinner()
                            .with_style(
                                ProgressStyle::with_template("{wide_msg}")
                                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                            )
                            .with_message(text);
                        live.more = Some(self.multi.add(more));
                    }
                }
            }
            _ => {}
        }
        // Clears the block, prints the lines gathered since the last redraw above it, and
        // draws the block again, up to date.
        let pending = std::mem::take(&mut live.pending);
        self.multi
            .suspend(|| crate::output::to_stderr_under_view(pending.into_bytes()));
    }

    /// The resource (or evaluation) `address` has ended: its line goes.
    fn ended(live: &mut Live, multi: &MultiProgress, address: &str) {
        if let Some(bar) = live.running.remove(address).and_then(|r| r.bar) {
            // Gone at the next redraw (with the line saying it ended): removing draws nothing.
            multi.remove(&bar);
            live.drawn -= 1;
        }
    }

    fn started(live: &mut Live, address: &str, operation: &'static str, status: String) {
        let previous = live.running.insert(
            address.to_string(),
            Running {
                operation,
                started: Instant::now(),
                status,
                counter: None,
                bar: None,
            },
        );
        if let Some(bar) = previous.and_then(|r| r.bar) {
            // Started again (a replacement's second half) while its line is up: keep the line.
            if let Some(r) = live.running.get_mut(address) {
                r.bar = Some(bar);
            }
        } else {
            live.waiting.push_back(address.to_string());
        }
    }
}

impl Drop for LiveEvents {
    /// Whatever ends the view, no gathered line is lost, the block of running resources goes,
    /// and stderr is written directly again.
    fn drop(&mut self) {
        let live = self.live.get_mut();
        for r in std::mem::take(&mut live.running).into_values() {
            if let Some(bar) = r.bar {
                self.multi.remove(&bar);
            }
        }
        if let Some(more) = live.more.take() {
            self.multi.remove(&more);
        }
        let _ = self.multi.clear();
        crate::output::route_stderr_through(None);
        let pending = std::mem::take(&mut live.pending);
        if !pending.is_empty() {
            crate::output::to_stderr(pending.as_bytes());
        }
    }
}

impl EventSink for LiveEvents {
    fn emit(&self, event: Event) {
        {
            let mut live = self.live.borrow_mut();
            let live = &mut *live;
            match &event {
                Event::ResourceStart {
                    address, operation, ..
                } => Self::started(live, address, operation, String::new()),
                Event::ResourceProgress {
                    address, progress, ..
                } => {
                    if let Some(r) = live.running.get_mut(address) {
                        match &progress.kind {
                            ProgressKind::Phase { name, .. } => r.status = name.clone(),
                            ProgressKind::Event { message, .. } => r.status = message.clone(),
                            ProgressKind::Log { line, .. } => r.status = line.clone(),
                            ProgressKind::Counter {
                                done,
                                expected,
                                unit,
                                ..
                            } => {
                                let was = r.counter.as_ref().map(|c| (c.1 > 0, c.2 == "bytes"));
                                r.counter = Some((*done, *expected, unit.clone()));
                                if let Some(bar) = &r.bar {
                                    if was != Some((*expected > 0, unit == "bytes")) {
                                        bar.set_style(line_style(r.counter.as_ref()));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Event::ResourceComplete { address, .. } | Event::ResourceFailed { address, .. } => {
                    Self::ended(live, &self.multi, address);
                }
                Event::EvaluationStart { file, stage } => {
                    Self::started(live, file, "evaluate", format!("stage {stage}"));
                }
                Event::EvaluationComplete { file, .. } | Event::EvaluationFailed { file, .. } => {
                    Self::ended(live, &self.multi, file);
                }
                _ => {}
            }
        }
        let now = matches!(
            event,
            Event::Plan { .. } | Event::Interrupted { .. } | Event::Summary { .. }
        );
        let above = self.lines.lines(event, true);
        let full = {
            let mut live = self.live.borrow_mut();
            for line in above {
                live.pending.push_str(&line);
                live.pending.push('\n');
            }
            live.pending.len() > PENDING_LIMIT
        };
        if now || full {
            self.redraw();
        }
    }
}
