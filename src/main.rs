use clap::Parser;
use ray_operator::autoscaler::fixture;
use ray_operator::cli::{Cli, Command};
use tracing::info;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("ray-operator {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Crd => {
            print!("{}", ray_operator::api::crd_yaml()?);
            Ok(())
        }
        Command::Plan { file, upscaling_speed } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            };
            let output = match upscaling_speed {
                Some(s) => fixture::plan_from_json_with_upscaling_speed(&text, s)?,
                None => fixture::plan_from_json(&text)?,
            };
            println!("{}", serde_json::to_string_pretty(&output)?);
            Ok(())
        }
        Command::Run(args) => {
            ray_operator::telemetry::init(cli.log_format);
            let settings = args.settings().map_err(anyhow::Error::msg)?;
            tokio::runtime::Builder::new_multi_thread()
                // Blocking work is rare (DNS of an overridden GCS address); bound it so thousands of
                // clusters cannot fan out into thousands of threads (and malloc arenas).
                .max_blocking_threads(8)
                .enable_all()
                .build()?
                .block_on(async move {
                    let mut config = kube::Config::infer().await?;
                    // A per-replica user agent makes each replica's requests identifiable in the API
                    // server's audit log (and proves fencing in our tests).
                    let agent = format!("ray-operator/{} ({})", env!("CARGO_PKG_VERSION"), settings.instance);
                    config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_str(&agent)?));
                    info!(
                        "ray-operator {} starting: scope {:?}, leader election {}, {} shards",
                        env!("CARGO_PKG_VERSION"),
                        settings.scope,
                        settings.leader.as_ref().map_or("off".to_string(), |l| format!(
                            "on (lease {}/{} as {})",
                            l.namespace, l.lease_name, l.identity
                        )),
                        settings.shards
                    );
                    ray_operator::runtime::run(config, settings).await
                })
        }
    }
}
