mod blkio_client;
mod boot;
mod device_blkio;
mod guest;
mod migrate;
mod store_cli;
mod store_props;
mod util;
