mod guest;
mod integration {}
