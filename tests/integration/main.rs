mod device_blkio;
mod guest;
mod util;
mod store_cli;
mod store_props;
mod integration {}
