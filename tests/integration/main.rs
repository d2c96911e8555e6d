mod boot;
mod device_blkio;
mod guest;
mod store_cli;
mod store_props;
mod util;
mod integration {}
